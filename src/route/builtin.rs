//! What the policy's built-in check ([`crate::policy::builtin`]) asks of this Keel: the
//! embedded models, whether a static answer builds, and the embedded contracts read the
//! way the adapters read them.

use crate::policy::builtin::Builtin;
use crate::policy::{ModelPolicy, PolicyError, StaticTensor};
use crate::upstream::embedded::Embedded;

use super::ladder;

impl Builtin for Embedded {
    fn embedded_models(&self) -> Vec<&str> {
        self.model_names().collect()
    }

    fn static_answer(&self, outputs: &[StaticTensor]) -> Result<(), String> {
        ladder::static_tensors(outputs).map(drop)
    }

    fn contract_problems(&self, name: &str, m: &ModelPolicy) -> Vec<PolicyError> {
        let Some(contract) = self.contract(name) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        for (version, a) in &m.adapters {
            let at = format!("models.{name}.adapters.{version:?}");
            for (path, message) in crate::adapt::version::check(a, &contract, &at) {
                problems.push(PolicyError { path, message });
            }
        }
        if let Some(v1) = &m.v1 {
            let at = format!("models.{name}.v1");
            // A name may be the model's, or what an adapted version's clients call it.
            let views: Vec<_> = std::iter::once(contract.clone())
                .chain(
                    m.adapters
                        .values()
                        .map(|a| crate::adapt::version::client_contract(a, &contract)),
                )
                .collect();
            let has_input = |i: &str| views.iter().any(|c| c.input(i).is_some());
            let has_output = |o: &str| views.iter().any(|c| c.output(o).is_some());
            if let Some(input) = v1.input.as_deref().filter(|i| !has_input(i)) {
                problems.push(PolicyError {
                    path: format!("{at}.input"),
                    message: format!("model {name:?} has no input {input:?}"),
                });
            }
            if let Some(output) = v1.output.as_deref().filter(|o| !has_output(o)) {
                problems.push(PolicyError {
                    path: format!("{at}.output"),
                    message: format!("model {name:?} has no output {output:?}"),
                });
            }
        }
        problems
    }
}
