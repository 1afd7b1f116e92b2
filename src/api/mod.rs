//! Custom resource types: what users write (spec) and what the operator reports (status).
//! No behaviour lives here; `crds/` is generated from these types by `apitoken-operator crd`.

mod api_token;
pub mod duration_rules;
mod policy;

pub use api_token::*;
pub use policy::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD of this operator as one multi-document YAML stream (what `crds/` holds).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    let crds: Vec<CustomResourceDefinition> = vec![ApiToken::crd(), ApiTokenPolicy::crd()];
    for crd in &crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(crd)?);
    }
    Ok(out)
}

/// A Markdown field reference for every CRD, generated from the same schema the API server
/// enforces (what `docs/crd-reference.md` holds; a test keeps it current).
pub fn field_reference() -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# CRD field reference\n\nGenerated from the Rust types by `apitoken-operator crd --reference` \
         (`make crds`; a test keeps it current). The descriptions are the ones `kubectl explain` shows; \
         types, defaults, allowed values and patterns come from the same schema the API server \
         enforces. Rules across fields (CEL) are listed under `x-kubernetes-validations` in `crds/`.\n",
    );
    for crd in [ApiToken::crd(), ApiTokenPolicy::crd()] {
        let v = &crd.spec.versions[0];
        let _ = write!(out, "\n## {} ({}/{})\n\n", crd.spec.names.kind, crd.spec.group, v.name);
        let schema = v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
        let Some(schema) = schema.and_then(|s| serde_json::to_value(s).ok()) else { continue };
        out.push_str("| field | type | default | description |\n|---|---|---|---|\n");
        for part in ["spec", "status"] {
            if let Some(s) = schema.pointer(&format!("/properties/{part}")) {
                walk(&mut out, part, s);
            }
        }
    }
    out
}

fn walk(out: &mut String, path: &str, s: &serde_json::Value) {
    use std::fmt::Write;
    let ty = match s.get("type").and_then(|t| t.as_str()) {
        Some("array") => {
            format!("[]{}", s.pointer("/items/type").and_then(|t| t.as_str()).unwrap_or("object"))
        }
        Some(t) => t.to_string(),
        None => s.get("enum").map_or("object".into(), |_| "enum".into()),
    };
    let default = s.get("default").map(|d| format!("`{d}`")).unwrap_or_default();
    let mut desc =
        s.get("description").and_then(|d| d.as_str()).unwrap_or("").replace('\n', " ").replace('|', "\\|");
    if let Some(values) = s.get("enum").and_then(|e| e.as_array()) {
        let values: Vec<String> =
            values.iter().filter_map(|v| v.as_str().map(|s| format!("`{s}`"))).collect();
        let _ = write!(desc, " One of {}.", values.join(", "));
    }
    if let Some(p) = s.get("pattern").and_then(|p| p.as_str()) {
        let _ = write!(desc, " Pattern `{}`.", p.replace('|', "\\|"));
    }
    let _ = writeln!(out, "| `{path}` | {ty} | {default} | {} |", desc.trim());
    let children = s.get("properties").or_else(|| s.pointer("/items/properties"));
    if let Some(props) = children.and_then(|p| p.as_object()) {
        let array = s.get("type").and_then(|t| t.as_str()) == Some("array");
        for (k, v) in props {
            let child = if array { format!("{path}[].{k}") } else { format!("{path}.{k}") };
            walk(out, &child, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn field_reference_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/crd-reference.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = super::field_reference();
        assert!(
            generated.contains("`spec.rotation.renewBefore`")
                && generated.contains("`spec.maxActiveTokens.perCreator`")
        );
        assert!(committed == generated, "docs/crd-reference.md is stale: run `make crds`");
    }

    #[test]
    fn crds_dir_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/apitoken.dev.yaml");
        let committed = std::fs::read_to_string(path).expect("crds/apitoken.dev.yaml exists");
        let generated = super::crds_yaml().unwrap();
        assert!(
            committed == generated,
            "crds/ is stale: regenerate it with `make crds` (apitoken-operator crd > crds/apitoken.dev.yaml)"
        );
    }
}
