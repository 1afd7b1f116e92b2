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

#[cfg(test)]
mod tests {
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
