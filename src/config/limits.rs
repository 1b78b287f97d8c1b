//! `[limits]`: per-caller request rates and Graph budgets (`0` = unlimited), and the
//! same four keys as overrides on `[[callers.api_keys]]` and `[[callers.jwt.apps]]`.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The defaults every caller gets (each caller its own buckets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// All requests of one caller, per second.
    pub requests_per_second: u32,
    /// Bucket size of the request rate; 0 = `requests_per_second`.
    pub requests_burst: u32,
    /// Requests of one caller that reach Graph (misses, `no-cache` revalidations, list
    /// pages), per minute. Requests that join a call another started do not count.
    pub graph_per_minute: u32,
    /// Bucket size of the Graph budget; 0 = `graph_per_minute / 6` (at least 1).
    pub graph_burst: u32,
}

/// One caller's overrides of [`LimitSettings`]; an absent key keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub requests_per_second: Option<u32>,
    pub requests_burst: Option<u32>,
    pub graph_per_minute: Option<u32>,
    pub graph_burst: Option<u32>,
}

/// One limit in force: so many per `window_secs`, with a bucket of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub quota: u32,
    pub window_secs: u32,
    pub burst: u32,
}

impl LimitSettings {
    /// The defaults with a caller's overrides applied.
    pub fn with(&self, o: LimitOverrides) -> LimitSettings {
        LimitSettings {
            requests_per_second: o.requests_per_second.unwrap_or(self.requests_per_second),
            requests_burst: o.requests_burst.unwrap_or(self.requests_burst),
            graph_per_minute: o.graph_per_minute.unwrap_or(self.graph_per_minute),
            graph_burst: o.graph_burst.unwrap_or(self.graph_burst),
        }
    }

    /// The request rate, unless unlimited.
    pub fn requests(&self) -> Option<Rate> {
        (self.requests_per_second > 0).then_some(Rate {
            quota: self.requests_per_second,
            window_secs: 1,
            burst: match self.requests_burst {
                0 => self.requests_per_second,
                b => b,
            },
        })
    }

    /// The Graph budget, unless unlimited.
    pub fn graph(&self) -> Option<Rate> {
        (self.graph_per_minute > 0).then_some(Rate {
            quota: self.graph_per_minute,
            window_secs: 60,
            burst: match self.graph_burst {
                0 => (self.graph_per_minute / 6).max(1),
                b => b,
            },
        })
    }

    /// A burst without its rate is a mistake worth naming (`prefix` is the table's key).
    pub(super) fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.requests_burst > 0 && self.requests_per_second == 0 {
            return Err(ConfigError::invalid(
                &format!("{prefix}requests_burst"),
                "needs requests_per_second > 0",
            ));
        }
        if self.graph_burst > 0 && self.graph_per_minute == 0 {
            return Err(ConfigError::invalid(
                &format!("{prefix}graph_burst"),
                "needs graph_per_minute > 0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_unlimited_and_bursts_default() {
        let none = LimitSettings::default();
        assert_eq!((none.requests(), none.graph()), (None, None));
        let some = LimitSettings {
            requests_per_second: 50,
            graph_per_minute: 60,
            ..LimitSettings::default()
        };
        assert_eq!(some.requests().map(|r| r.burst), Some(50));
        assert_eq!(
            some.graph().map(|r| (r.burst, r.window_secs)),
            Some((10, 60))
        );
        let tiny = LimitSettings {
            graph_per_minute: 3,
            ..LimitSettings::default()
        };
        assert_eq!(tiny.graph().map(|r| r.burst), Some(1));
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let defaults = LimitSettings {
            requests_per_second: 10,
            graph_per_minute: 6,
            ..LimitSettings::default()
        };
        let mine = defaults.with(LimitOverrides {
            graph_per_minute: Some(120),
            ..LimitOverrides::default()
        });
        assert_eq!((mine.requests_per_second, mine.graph_per_minute), (10, 120));
        let unlimited = defaults.with(LimitOverrides {
            requests_per_second: Some(0),
            ..LimitOverrides::default()
        });
        assert_eq!(unlimited.requests(), None);
    }

    #[test]
    fn a_burst_without_a_rate_names_its_key() {
        let bad = LimitSettings {
            graph_burst: 5,
            ..LimitSettings::default()
        };
        let err = bad.validate("limits.").unwrap_err().to_string();
        assert!(err.contains("limits.graph_burst"), "{err}");
    }
}
