//! Per-call settings: the types the resilience layers consume, the partial form each policy
//! layer writes, and the one pure function that resolves them for a call.
//!
//! # Resolution
//!
//! Effective settings for a call are built field by field, later layers winning:
//! built-in defaults < `[defaults]` < `[methods."<method>"]` < `[models.<model>]`.
//! A layer sets only the fields it names; `retry.max_attempts` in a model leaves that
//! model's other retry fields to the method and the defaults.

use std::time::Duration;

use super::reader::{Problems, Section};

/// Longest duration any timeout or backoff may be.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The classes of the error taxonomy, as policy names them (`retry_on`, fallback triggers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// UNAVAILABLE, connection refused or reset.
    Transient,
    /// RESOURCE_EXHAUSTED or server pushback.
    Overloaded,
    /// A per-try timeout fired while the call's deadline had time left.
    AttemptTimeout,
    /// The call's deadline ran out.
    DeadlineExceeded,
    /// The request is wrong (INVALID_ARGUMENT, NOT_FOUND, ...).
    ClientError,
    /// The server failed (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED).
    ServerBug,
    /// Keel refused the call itself (breaker open, budget exhausted, shed).
    LocalRejection,
}

impl ErrorClass {
    /// Every class.
    pub const ALL: [ErrorClass; 7] = [
        ErrorClass::Transient,
        ErrorClass::Overloaded,
        ErrorClass::AttemptTimeout,
        ErrorClass::DeadlineExceeded,
        ErrorClass::ClientError,
        ErrorClass::ServerBug,
        ErrorClass::LocalRejection,
    ];

    /// The policy spelling (`attempt_timeout`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::AttemptTimeout => "attempt_timeout",
            ErrorClass::DeadlineExceeded => "deadline_exceeded",
            ErrorClass::ClientError => "client_error",
            ErrorClass::ServerBug => "server_bug",
            ErrorClass::LocalRejection => "local_rejection",
        }
    }

    /// Parses the policy spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// What a retry may be for: a class of the taxonomy or one status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// Every error of this class.
    Class(ErrorClass),
    /// Errors with this status code.
    Code(tonic::Code),
}

impl RetryOn {
    /// Parses `transient` or `UNAVAILABLE`.
    pub fn parse(s: &str) -> Option<Self> {
        ErrorClass::parse(s).map(RetryOn::Class).or_else(|| {
            crate::grpc_code::parse(s)
                .filter(|c| *c != tonic::Code::Ok)
                .map(RetryOn::Code)
        })
    }

    /// The policy spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryOn::Class(c) => c.as_str(),
            RetryOn::Code(code) => crate::grpc_code::name(*code),
        }
    }
}

/// How the backoff before a retry is randomised (gRPC's retry design uses `full`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// A uniformly random wait in `[0, backoff]`.
    Full,
    /// Half the backoff, plus a random wait in `[0, backoff / 2]`.
    Equal,
    /// Exactly the backoff.
    None,
}

impl Jitter {
    /// The policy spellings.
    pub const NAMES: [&'static str; 3] = ["full", "equal", "none"];

    /// Parses `full`, `equal` or `none`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            "none" => Some(Jitter::None),
            _ => None,
        }
    }

    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::None => "none",
        }
    }
}

/// Declares a settings group: the full struct the layers consume, its partial form (every
/// field optional) that one policy layer writes, and how a partial applies to a full one.
macro_rules! group {
    ($(#[$m:meta])* $full:ident / $partial:ident { $($(#[$fm:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $full { $($(#[$fm])* pub $field: $ty,)* }

        #[doc = concat!("The fields of [`", stringify!($full), "`] one policy layer sets; `None` inherits.")]
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $partial { $(#[allow(missing_docs)] pub $field: Option<$ty>,)* }

        impl $partial {
            /// Overwrites the fields this layer sets.
            pub fn apply_to(&self, full: &mut $full) {
                $(if let Some(v) = &self.$field { full.$field = v.clone(); })*
            }
        }
    };
}

group! {
    /// Retries: how many, how spaced, for which errors.
    Retry / RetryOverrides {
        /// Attempts in all, the first included (1 = no retry). 1..=10.
        max_attempts: u32,
        /// Backoff before the first retry.
        initial_backoff: Duration,
        /// Longest backoff; at least `initial_backoff`.
        max_backoff: Duration,
        /// Growth of the backoff per retry; at least 1.
        multiplier: f64,
        /// How each backoff is randomised (deterministically per request).
        jitter: Jitter,
        /// Error classes or status codes that may be retried.
        retry_on: Vec<RetryOn>,
        /// Bound on each attempt; at most the call's timeout. `None`: only the deadline.
        per_try_timeout: Option<Duration>,
        /// After this long without an answer, send the same (idempotent) call again to the
        /// next endpoint; the first success wins. `None`: no hedging.
        hedge_delay: Option<Duration>,
    }
}

group! {
    /// The retry budget: retries may add at most `ratio` of the calls, plus a floor.
    Budget / BudgetOverrides {
        /// Retries allowed per call, 0..=1 (0.2 = at most 20% extra load).
        ratio: f64,
        /// Retries allowed per second whatever the ratio, so a quiet service can still retry.
        min_per_sec: u32,
        /// The window calls are counted over, 1s..=60s.
        window: Duration,
    }
}

group! {
    /// Circuit breaking per model and upstream.
    Breaker / BreakerOverrides {
        /// Whether the breaker acts at all.
        enabled: bool,
        /// Failures in a row that open the breaker.
        consecutive_failures: u32,
        /// Failure share in the window that opens the breaker, 0..=1.
        failure_ratio: f64,
        /// Calls in the window before the ratio is trusted.
        min_requests: u32,
        /// The window failures are counted over.
        window: Duration,
        /// How long an open breaker refuses calls before probing, the first time.
        open_for: Duration,
        /// Longest open time, as it doubles on repeated trips.
        max_open_for: Duration,
        /// Probe calls let through while half-open.
        half_open_probes: u32,
        /// An attempt that does not fail but takes longer than this counts as slow.
        /// `None`: slowness never opens the breaker.
        slow_call_duration: Option<Duration>,
        /// Slow share in the window that opens the breaker (once `min_requests` calls were
        /// seen), 0..=1; only with `slow_call_duration`.
        slow_call_ratio: f64,
    }
}

group! {
    /// Concurrency limits and load shedding, per model.
    Limits / LimitOverrides {
        /// Calls in flight at once.
        max_in_flight: u32,
        /// Calls that may wait for a slot; more are shed at once.
        max_queue: u32,
        /// Longest wait for a slot before the call is shed.
        queue_timeout: Duration,
        /// Share of the slots (rounded up, never all) only interactive callers may take, so
        /// batch tenants are shed first. 0..=1.
        interactive_reserve: f64,
        /// Bytes of tensor data one inference request may carry, over every input.
        max_request_bytes: u64,
        /// Tensor elements one inference request may carry, over every input.
        max_elements: u64,
        /// Input tensors one inference request may carry: validation is linear in them,
        /// and this bounds what one request can make Keel do.
        max_inputs: u32,
        /// Outputs one inference request may ask for.
        max_outputs: u32,
    }
}

/// Effective settings of one call.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The method's deadline: a call never runs longer, whatever the client asks.
    pub timeout: Duration,
    /// Hard cap on any deadline.
    pub max_timeout: Duration,
    /// Taken off the time left when Keel tells an upstream its `grpc-timeout`, so Keel still
    /// has time to answer after the upstream gives up.
    pub deadline_margin: Duration,
    /// A call that succeeds but takes longer than this is marked slow (logged, counted).
    pub slow_threshold: Option<Duration>,
    /// Whether the call may be repeated safely. Non-idempotent calls are retried only when
    /// the request provably never reached the upstream.
    pub idempotent: bool,
    /// Refuse at once a call whose deadline is shorter than the fastest answer seen.
    pub refuse_hopeless: bool,
    /// Refuse a request for an output the forwarded model's metadata does not list. Off by
    /// default: some servers answer outputs their metadata leaves out (MLServer's
    /// scikit-learn runtime and `predict_proba`), so the upstream decides. Embedded models
    /// always check, whatever this says.
    pub strict_outputs: bool,
    /// Retries.
    pub retry: Retry,
    /// Retry budget.
    pub budget: Budget,
    /// Circuit breaker.
    pub breaker: Breaker,
    /// Limits.
    pub limits: Limits,
    /// Faults to inject; `None`: none.
    pub fault: Option<super::Fault>,
}

/// What one policy layer (`[defaults]`, a method, a model) sets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `max_timeout`.
    pub max_timeout: Option<Duration>,
    /// `deadline_margin`.
    pub deadline_margin: Option<Duration>,
    /// `slow_threshold`.
    pub slow_threshold: Option<Duration>,
    /// `idempotent`.
    pub idempotent: Option<bool>,
    /// `refuse_hopeless`.
    pub refuse_hopeless: Option<bool>,
    /// `strict_outputs`.
    pub strict_outputs: Option<bool>,
    /// `[retry]`.
    pub retry: RetryOverrides,
    /// `[retry.budget]`.
    pub budget: BudgetOverrides,
    /// `[breaker]`.
    pub breaker: BreakerOverrides,
    /// `[limits]`.
    pub limits: LimitOverrides,
    /// `[fault]`: replaces a less specific layer's as a whole.
    pub fault: Option<super::Fault>,
}

impl Default for Settings {
    /// Keel's built-in defaults, used for every field no layer sets.
    fn default() -> Self {
        Settings {
            timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            deadline_margin: Duration::from_millis(5),
            slow_threshold: None,
            idempotent: true,
            refuse_hopeless: false,
            strict_outputs: false,
            retry: Retry {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(25),
                max_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                jitter: Jitter::Full,
                retry_on: vec![
                    RetryOn::Class(ErrorClass::Transient),
                    RetryOn::Class(ErrorClass::Overloaded),
                    RetryOn::Class(ErrorClass::AttemptTimeout),
                ],
                per_try_timeout: None,
                hedge_delay: None,
            },
            budget: Budget {
                ratio: 0.2,
                min_per_sec: 10,
                window: Duration::from_secs(10),
            },
            breaker: Breaker {
                enabled: true,
                consecutive_failures: 5,
                failure_ratio: 0.5,
                min_requests: 20,
                window: Duration::from_secs(10),
                open_for: Duration::from_secs(5),
                max_open_for: Duration::from_secs(60),
                half_open_probes: 3,
                slow_call_duration: None,
                slow_call_ratio: 0.5,
            },
            limits: Limits {
                max_in_flight: 1024,
                max_queue: 1024,
                queue_timeout: Duration::from_millis(100),
                interactive_reserve: 0.1,
                max_request_bytes: 64 << 20,
                max_elements: 64 << 20,
                max_inputs: 1024,
                max_outputs: 1024,
            },
            fault: None,
        }
    }
}

impl Overrides {
    /// Overwrites what this layer sets.
    pub fn apply_to(&self, s: &mut Settings) {
        if let Some(t) = self.timeout {
            s.timeout = t;
        }
        if let Some(t) = self.max_timeout {
            s.max_timeout = t;
        }
        if let Some(m) = self.deadline_margin {
            s.deadline_margin = m;
        }
        if let Some(t) = self.slow_threshold {
            s.slow_threshold = Some(t);
        }
        if let Some(b) = self.idempotent {
            s.idempotent = b;
        }
        if let Some(b) = self.refuse_hopeless {
            s.refuse_hopeless = b;
        }
        if let Some(b) = self.strict_outputs {
            s.strict_outputs = b;
        }
        self.retry.apply_to(&mut s.retry);
        self.budget.apply_to(&mut s.budget);
        self.breaker.apply_to(&mut s.breaker);
        self.limits.apply_to(&mut s.limits);
        if let Some(f) = &self.fault {
            s.fault = Some(f.clone());
        }
    }

    /// Reads the settings keys of a layer's section; other keys are left to the caller.
    pub(super) fn read(s: &mut Section<'_>, p: &mut Problems) -> Overrides {
        let mut o = Overrides {
            timeout: s.duration(p, "timeout", MAX_DURATION),
            max_timeout: s.duration(p, "max_timeout", MAX_DURATION),
            deadline_margin: s.duration(p, "deadline_margin", Duration::from_secs(10)),
            slow_threshold: s.duration(p, "slow_threshold", MAX_DURATION),
            idempotent: s.boolean(p, "idempotent"),
            refuse_hopeless: s.boolean(p, "refuse_hopeless"),
            strict_outputs: s.boolean(p, "strict_outputs"),
            ..Overrides::default()
        };
        if let Some(mut r) = s.table(p, "retry") {
            o.retry = RetryOverrides {
                max_attempts: r.count(p, "max_attempts", 1..=10),
                initial_backoff: r.duration(p, "initial_backoff", MAX_DURATION),
                max_backoff: r.duration(p, "max_backoff", MAX_DURATION),
                multiplier: r.number(p, "multiplier", 1.0..=10.0),
                jitter: r.string(p, "jitter").and_then(|j| {
                    let parsed = Jitter::parse(&j);
                    if parsed.is_none() {
                        p.add(
                            r.at("jitter"),
                            format!("{j:?} is not one of {}", Jitter::NAMES.join(", ")),
                        );
                    }
                    parsed
                }),
                retry_on: r.strings(p, "retry_on").map(|items| {
                    let path = r.at("retry_on");
                    items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| {
                            let parsed = RetryOn::parse(s);
                            if parsed.is_none() {
                                p.add(
                                    format!("{path}[{i}]"),
                                    format!(
                                        "{s:?} is neither an error class ({}) nor a gRPC status code name such as UNAVAILABLE",
                                        ErrorClass::ALL.map(ErrorClass::as_str).join(", ")
                                    ),
                                );
                            }
                            parsed
                        })
                        .collect()
                }),
                per_try_timeout: r.duration(p, "per_try_timeout", MAX_DURATION).map(Some),
                hedge_delay: r.duration(p, "hedge_delay", MAX_DURATION).map(Some),
            };
            if let Some(mut b) = r.table(p, "budget") {
                o.budget = BudgetOverrides {
                    ratio: b.number(p, "ratio", 0.0..=1.0),
                    min_per_sec: b.count(p, "min_per_sec", 0..=100_000),
                    window: b
                        .duration(p, "window", Duration::from_secs(60))
                        .filter(|w| {
                            let ok = *w >= Duration::from_secs(1);
                            if !ok {
                                p.add(b.at("window"), "must be at least 1s");
                            }
                            ok
                        }),
                };
                b.finish(p);
            }
            r.finish(p);
        }
        if let Some(mut b) = s.table(p, "breaker") {
            o.breaker = BreakerOverrides {
                enabled: b.boolean(p, "enabled"),
                consecutive_failures: b.count(p, "consecutive_failures", 1..=1_000_000),
                failure_ratio: b.number(p, "failure_ratio", 0.0..=1.0),
                min_requests: b.count(p, "min_requests", 1..=1_000_000),
                window: b.duration(p, "window", MAX_DURATION),
                open_for: b.duration(p, "open_for", MAX_DURATION),
                max_open_for: b.duration(p, "max_open_for", MAX_DURATION),
                half_open_probes: b.count(p, "half_open_probes", 1..=1000),
                slow_call_duration: b.duration(p, "slow_call_duration", MAX_DURATION).map(Some),
                slow_call_ratio: b.number(p, "slow_call_ratio", 0.0..=1.0),
            };
            b.finish(p);
        }
        o.fault = super::fault::read(s, p);
        if let Some(mut l) = s.table(p, "limits") {
            o.limits = LimitOverrides {
                max_in_flight: l.count(p, "max_in_flight", 1..=1_000_000),
                max_queue: l.count(p, "max_queue", 0..=1_000_000),
                queue_timeout: l.duration(p, "queue_timeout", MAX_DURATION),
                interactive_reserve: l.number(p, "interactive_reserve", 0.0..=1.0),
                max_request_bytes: l.size(p, "max_request_bytes").map(|n| n as u64),
                max_elements: l
                    .integer(p, "max_elements", 1..=i64::MAX)
                    .map(i64::unsigned_abs),
                max_inputs: l.count(p, "max_inputs", 1..=100_000),
                max_outputs: l.count(p, "max_outputs", 1..=100_000),
            };
            l.finish(p);
        }
        o
    }
}

impl Settings {
    /// The rules that tie fields together, each broken one as a message.
    pub fn broken_rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.timeout > self.max_timeout {
            out.push(format!(
                "timeout ({}) must be <= max_timeout ({})",
                super::format_duration(self.timeout),
                super::format_duration(self.max_timeout)
            ));
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            out.push(format!(
                "retry.initial_backoff ({}) must be <= retry.max_backoff ({})",
                super::format_duration(self.retry.initial_backoff),
                super::format_duration(self.retry.max_backoff)
            ));
        }
        if self.breaker.open_for > self.breaker.max_open_for {
            out.push(format!(
                "breaker.open_for ({}) must be <= breaker.max_open_for ({})",
                super::format_duration(self.breaker.open_for),
                super::format_duration(self.breaker.max_open_for)
            ));
        }
        if let Some(t) = self.retry.per_try_timeout
            && t > self.timeout
        {
            out.push(format!(
                "retry.per_try_timeout ({}) must be <= timeout ({})",
                super::format_duration(t),
                super::format_duration(self.timeout)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_field_by_field() {
        let defaults = Overrides {
            timeout: Some(Duration::from_secs(10)),
            retry: RetryOverrides {
                max_attempts: Some(4),
                initial_backoff: Some(Duration::from_millis(50)),
                ..Default::default()
            },
            ..Default::default()
        };
        let model = Overrides {
            retry: RetryOverrides {
                max_attempts: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut s = Settings::default();
        defaults.apply_to(&mut s);
        model.apply_to(&mut s);
        assert_eq!(s.timeout, Duration::from_secs(10), "from defaults");
        assert_eq!(s.retry.max_attempts, 2, "the model wins");
        assert_eq!(
            s.retry.initial_backoff,
            Duration::from_millis(50),
            "inherited"
        );
        assert_eq!(s.retry.max_backoff, Duration::from_secs(1), "built in");
    }

    #[test]
    fn the_built_in_defaults_break_no_rule() {
        assert!(Settings::default().broken_rules().is_empty());
    }

    #[test]
    fn cross_field_rules_are_named() {
        let mut s = Settings::default();
        s.retry.initial_backoff = Duration::from_secs(2);
        s.retry.per_try_timeout = Some(Duration::from_secs(60));
        s.timeout = Duration::from_secs(600);
        assert_eq!(
            s.broken_rules(),
            [
                "timeout (600s) must be <= max_timeout (300s)",
                "retry.initial_backoff (2s) must be <= retry.max_backoff (1s)",
            ]
        );
        s.timeout = Duration::from_secs(30);
        assert_eq!(
            s.broken_rules(),
            [
                "retry.initial_backoff (2s) must be <= retry.max_backoff (1s)",
                "retry.per_try_timeout (60s) must be <= timeout (30s)",
            ]
        );
    }

    #[test]
    fn retry_on_takes_classes_and_codes() {
        assert_eq!(
            RetryOn::parse("transient"),
            Some(RetryOn::Class(ErrorClass::Transient))
        );
        assert_eq!(
            RetryOn::parse("UNAVAILABLE"),
            Some(RetryOn::Code(tonic::Code::Unavailable))
        );
        assert_eq!(RetryOn::parse("unavailable"), None);
        assert_eq!(RetryOn::Code(tonic::Code::Aborted).as_str(), "ABORTED");
    }
}
