//! How each routed model stands, for Keel's readiness view.

use super::Target;
use super::select::Routes;

/// How one model stands, for health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelHealth {
    /// The model.
    pub model: String,
    /// Whether Keel's readiness depends on it.
    pub required: bool,
    /// Why it cannot answer now; `None` when it can.
    pub problem: Option<String>,
}

impl Routes {
    /// How each routed model stands: whether a call could be answered now (a route on a
    /// target whose breakers are not all open, or a fallback ladder), and why not.
    pub fn health(&self) -> Vec<ModelHealth> {
        self.models
            .iter()
            .map(|(name, m)| {
                let up = |t: &Target| {
                    t.backend.healthy()
                        && t.breaker
                            .as_ref()
                            .is_none_or(|b| b.state() != crate::resilience::BreakerState::Open)
                };
                let problem = if let Some(w) = &m.switched_off {
                    Some(format!("switched off ({w})"))
                } else if m.entries.iter().any(|e| e.weight > 0 && up(&e.target)) {
                    None
                } else if !m.ladder.is_empty() {
                    // Degraded, but answering.
                    None
                } else {
                    Some(
                        "no route can take calls: no upstream endpoint is serving, or the breaker is open"
                            .into(),
                    )
                };
                ModelHealth {
                    model: name.clone(),
                    required: m.required,
                    problem,
                }
            })
            .collect()
    }
}
