{{- define "apitoken-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apitoken-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "apitoken-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apitoken-operator.serviceAccountName" -}}
{{- default (include "apitoken-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Lease the replicas of this release elect a leader on: one per release. */}}
{{- define "apitoken-operator.leaseName" -}}
{{- include "apitoken-operator.fullname" . -}}
{{- end -}}

{{/* The ConfigMap (key ca.crt) the operator publishes: the CA verification clients trust. */}}
{{- define "apitoken-operator.caConfigMap" -}}
{{- printf "%s-ca" (include "apitoken-operator.fullname" .) -}}
{{- end -}}

{{/* The serving certificate Secret: self-managed (holds the CA's key) or cert-manager's. */}}
{{- define "apitoken-operator.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "apitoken-operator.fullname" .) -}}
{{- end -}}

{{/* Service names are DNS labels (63 characters): leave room for the suffix. */}}
{{- define "apitoken-operator.metricsService" -}}
{{- printf "%s-metrics" (include "apitoken-operator.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* What the binary runs: admission exactly when the webhooks are installed. */}}
{{- define "apitoken-operator.components" -}}
{{- if .Values.webhook.enabled -}}
{{- join "," .Values.components -}}
{{- else -}}
{{- without .Values.components "admission" | join "," -}}
{{- end -}}
{{- end -}}

{{/* shutdownDelay in whole seconds (the schema allows only "<n>s"). */}}
{{- define "apitoken-operator.shutdownDelaySeconds" -}}
{{- trimSuffix "s" .Values.shutdownDelay | int -}}
{{- end -}}

{{- define "apitoken-operator.terminationGracePeriodSeconds" -}}
{{- $delay := include "apitoken-operator.shutdownDelaySeconds" . | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $delay 15 -}}
{{- else if le (int .Values.terminationGracePeriodSeconds) $delay -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed shutdownDelay (%s): the kubelet would kill the operator while it still drains; leave it empty for shutdownDelay + 15 s" .Values.terminationGracePeriodSeconds .Values.shutdownDelay) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- end -}}
{{- end -}}

{{/* Combinations of values that cannot work, refused with what to do (a JSON schema could
refuse them too, but its messages do not say why). */}}
{{- define "apitoken-operator.validate" -}}
{{- if and .Values.certManager.enabled (not .Values.webhook.enabled) -}}
{{- fail "certManager.enabled=true needs webhook.enabled=true: cert-manager issues the webhooks' serving certificate; without webhooks the operator serves verification with its self-managed CA (published in the ConfigMap <release>-ca). Set certManager.enabled=false or webhook.enabled=true" -}}
{{- end -}}
{{- if and .Values.webhook.enabled (not (has "admission" .Values.components)) -}}
{{- fail "webhook.enabled=true needs \"admission\" in components: the API server would call webhooks nobody serves and refuse every ApiToken write. Add admission to components, or set webhook.enabled=false" -}}
{{- end -}}
{{- if and (not .Values.leaderElection) (has "controller" .Values.components) (gt (int .Values.replicaCount) 1) -}}
{{- fail (printf "leaderElection=false with replicaCount=%v: every replica would reconcile the same tokens (duplicate rotations). Set replicaCount=1, or keep leaderElection=true" .Values.replicaCount) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.webhook.enabled .Values.networkPolicy.verifyFrom (not .Values.networkPolicy.apiServerCIDRs) (not .Values.networkPolicy.apiServerFrom) -}}
{{- fail "networkPolicy.verifyFrom restricts port 8443, which also serves the admission webhooks, and the API server is not a pod that a selector can match: set networkPolicy.apiServerCIDRs to the addresses the API server connects from, or networkPolicy.apiServerFrom to the tunnel pods it calls through (docs/helm.md, \"NetworkPolicy\")" -}}
{{- end -}}
{{- end -}}
