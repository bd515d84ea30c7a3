//! The checks of a policy against what this Keel has built in, made when a policy is
//! applied and by `keel validate`; they open nothing.
//!
//! `policy` knows no backend, tensor or adapter code, so what only that code can tell comes
//! in through [`Builtin`] (the router implements it for the embedded models).
//!
//! # Errors
//!
//! Every problem at its path: a route to `embedded` for a model that is not built in
//! (`models.<m>.backend`, or `models.<m>.routes[<i>].backend`), a static answer that cannot
//! be built (`models.<m>.fallback[<i>].static`), and, for a model served by embedded models
//! only, adapters and a v1 mapping that name what its contract lacks.

use super::{BackendRef, ModelPolicy, Policy, PolicyError, PolicyErrors, StaticTensor, Tier};

/// What the checks need to know of what this Keel has built in.
pub trait Builtin {
    /// The embedded models' names, in the order a message lists them.
    fn embedded_models(&self) -> Vec<&str>;
    /// Why `outputs` cannot make a fallback's static answer, if they cannot.
    fn static_answer(&self, outputs: &[StaticTensor]) -> Result<(), String>;
    /// The problems of `model`'s adapters and v1 mapping against the contract of the
    /// embedded model `name`; empty when they fit or no embedded model has that name.
    fn contract_problems(&self, name: &str, model: &ModelPolicy) -> Vec<PolicyError>;
}

/// Checks the parts of `policy` that depend on what Keel has built in: every model routed
/// to `embedded` must be an embedded model, every static answer must build, and a model
/// served only by embedded models must have the inputs and outputs its adapters and v1
/// mapping name.
pub fn check(policy: &Policy, builtin: &dyn Builtin) -> Result<(), PolicyErrors> {
    let Some(models) = &policy.models else {
        return Ok(());
    };
    let embedded = builtin.embedded_models();
    let mut problems = Vec::new();
    for (name, m) in models {
        for (i, r) in m.routes.iter().enumerate() {
            if r.backend == BackendRef::Embedded && !embedded.contains(&name.as_str()) {
                let path = if m.routes.len() == 1 {
                    format!("models.{name}.backend")
                } else {
                    format!("models.{name}.routes[{i}].backend")
                };
                problems.push(PolicyError {
                    path,
                    message: format!(
                        "there is no embedded model named {name:?} (embedded models: {})",
                        embedded.join(", ")
                    ),
                });
            }
        }
    }
    for (name, m) in models {
        for (i, f) in m.fallback.iter().enumerate() {
            if let Tier::Static(outputs) = &f.tier
                && let Err(message) = builtin.static_answer(outputs)
            {
                problems.push(PolicyError {
                    path: format!("models.{name}.fallback[{i}].static"),
                    message,
                });
            }
        }
    }
    // Adapters and v1 mappings of models served only by embedded models are checked
    // against their contracts now; an upstream's contract is known at the first call.
    for (name, m) in models {
        if m.routes.iter().all(|r| r.backend == BackendRef::Embedded) {
            problems.extend(builtin.contract_problems(name, m));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Keel with one embedded model whose static answers never build.
    struct Fake;

    impl Builtin for Fake {
        fn embedded_models(&self) -> Vec<&str> {
            vec!["iris"]
        }
        fn static_answer(&self, _: &[StaticTensor]) -> Result<(), String> {
            Err("no".into())
        }
        fn contract_problems(&self, _: &str, _: &ModelPolicy) -> Vec<PolicyError> {
            Vec::new()
        }
    }

    #[test]
    fn every_problem_is_reported_at_its_path_in_policy_order() {
        let p = Policy::parse(
            "[models.iris]\nbackend = \"embedded\"\n\
             fallback = [{ static = [{ name = \"y\", datatype = \"INT32\", shape = [1], data = [0] }] }]\n\
             [models.resnet]\nbackend = \"embedded\"\n",
        )
        .unwrap();
        let e = check(&p, &Fake).unwrap_err();
        let paths: Vec<_> = e.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["models.resnet.backend", "models.iris.fallback[0].static"]
        );
        assert_eq!(
            e.0[0].message,
            "there is no embedded model named \"resnet\" (embedded models: iris)"
        );
    }
}
