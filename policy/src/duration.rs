//! Durations as people write them in a MicroService: `250ms`, `2s`, `5m`, `1h`.
//!
//! The CRD validates the same pattern ([`DURATION_PATTERN`]), so the apiserver
//! refuses a bad duration at `kubectl apply` and the sidecar never sees one.

use std::{fmt, str::FromStr, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration field carries in the CRD's OpenAPI schema.
pub const DURATION_PATTERN: &str = "^[0-9]{1,9}(ms|s|m|h)$";

/// The CEL rule on every duration that must be more than zero (a timeout, a
/// window): the pattern admits `0s`, `0ms` and `000m`, which this refuses.
pub const NONZERO_DURATION_RULE: &str = "!self.matches('^0+(ms|s|m|h)$')";

/// A non-negative duration written as an integer and a unit (`ms`, `s`, `m`, `h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(time::Duration);

impl Duration {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(time::Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(time::Duration::from_secs(s))
    }

    /// The standard library duration.
    pub const fn get(self) -> time::Duration {
        self.0
    }
}

impl From<Duration> for time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {input:?}: expected an integer and a unit (ms, s, m or h), like 250ms or 2s"
)]
pub struct ParseDurationError {
    input: String,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError {
            input: s.to_owned(),
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() || digits.len() > 9 {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        let d = match unit {
            "ms" => time::Duration::from_millis(n),
            "s" => time::Duration::from_secs(n),
            "m" => time::Duration::from_secs(n * 60),
            "h" => time::Duration::from_secs(n * 3600),
            _ => return Err(err()),
        };
        Ok(Self(d))
    }
}

impl fmt::Display for Duration {
    /// The shortest exact form: `1500ms`, `2s`, `5m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 11,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!("250ms".parse(), Ok(Duration::from_millis(250)));
        assert_eq!("2s".parse(), Ok(Duration::from_secs(2)));
        assert_eq!("5m".parse(), Ok(Duration::from_secs(300)));
        assert_eq!("1h".parse(), Ok(Duration::from_secs(3600)));
        assert_eq!("0s".parse(), Ok(Duration::from_secs(0)));
    }

    #[test]
    fn refuses_what_the_crd_pattern_refuses() {
        for bad in [
            "",
            "s",
            "10",
            "1.5s",
            "-1s",
            "2 s",
            "2sec",
            "1d",
            "1234567890s",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn displays_the_shortest_exact_form_and_round_trips() {
        for (d, s) in [
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_millis(0), "0s"),
        ] {
            assert_eq!(d.to_string(), s);
            assert_eq!(s.parse::<Duration>().unwrap(), d);
        }
    }
}
