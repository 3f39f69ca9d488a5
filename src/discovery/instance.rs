//! [`Instance`], its id, its health check and its health: plain data, validated on build.

use crate::config::{duration_in_range, int_in_range, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;
use uuid::Uuid;

/// Metadata entries an instance may carry.
const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key or value, in bytes.
const MAX_METADATA_LEN: usize = 512;
/// Tags an instance may carry.
const MAX_TAGS: usize = 64;
const ONE_DAY: Duration = Duration::from_secs(86_400);

/// Names one registered instance: a UUID (v7, so ids sort by registration time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub Uuid);

impl InstanceId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An instance's health, as Consul reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Serving: balancers send it traffic.
    Passing,
    /// Degraded (an HTTP check answered 429): still registered and readable, but
    /// [`discover`](super::discover) sends it no new traffic until it passes again.
    Warning,
    /// Not serving: failed its check, or missed its heartbeat.
    Critical,
    /// Not checked yet.
    #[default]
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
            Self::Unknown => "unknown",
        })
    }
}

/// How the registry learns an instance's health.
///
/// Serialized as `{ "kind": "none" }`, `{ "kind": "ttl", "ttl": "10s" }`,
/// `{ "kind": "tcp", "interval": "5s", "timeout": "1s" }` or
/// `{ "kind": "http", "path": "/health", "interval": "5s", "timeout": "1s" }`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// No check: the instance is `Passing` while registered.
    #[default]
    None,
    /// The instance proves it is alive with [`heartbeat`](super::Registry::heartbeat)s; one
    /// that misses a heartbeat for `ttl` turns `Critical` (and is removed once it has been
    /// critical for the instance's `deregister_after`, if set).
    Ttl {
        /// How long a heartbeat keeps the instance passing, in `[1s, 1day]`.
        #[serde(with = "crate::duration")]
        ttl: Duration,
    },
    /// Connect to the instance's own `host:port`.
    Tcp {
        /// Time between checks (jittered by up to 10 %), in `[100ms, 1day]`.
        #[serde(with = "crate::duration")]
        interval: Duration,
        /// Time allowed for one check, in `[1ms, interval]`.
        #[serde(with = "crate::duration")]
        timeout: Duration,
        /// Consecutive failures that turn the instance critical, in `[1, 100]`. Default 1.
        #[serde(default = "one")]
        failures_before_critical: u32,
        /// Consecutive successes that turn it passing again, in `[1, 100]`. Default 1.
        #[serde(default = "one")]
        successes_before_passing: u32,
    },
    /// `GET` a path on the instance's own `host:port` (the `http` feature): 2xx is passing,
    /// 429 warning, anything else critical, as Consul does. Plain HTTP/1 only: an instance
    /// whose metadata says `scheme = "https"` is refused this check when built.
    Http {
        /// An absolute path such as `/health`, never a URL: only the instance itself is
        /// ever probed.
        path: String,
        /// Time between checks (jittered by up to 10 %), in `[100ms, 1day]`.
        #[serde(with = "crate::duration")]
        interval: Duration,
        /// Time allowed for one check, in `[1ms, interval]`.
        #[serde(with = "crate::duration")]
        timeout: Duration,
        /// Consecutive failures that turn the instance critical, in `[1, 100]`. Default 1.
        #[serde(default = "one")]
        failures_before_critical: u32,
        /// Consecutive successes that turn it passing again, in `[1, 100]`. Default 1.
        #[serde(default = "one")]
        successes_before_passing: u32,
    },
}

fn one() -> u32 {
    1
}

impl HealthCheck {
    /// The health an instance starts with under this check: `Passing` without a check or with
    /// a TTL (registering is a first heartbeat), `Unknown` until an active check has run.
    pub fn initial_health(&self) -> Health {
        match self {
            Self::None | Self::Ttl { .. } => Health::Passing,
            Self::Tcp { .. } | Self::Http { .. } => Health::Unknown,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at = |e: ConfigError| e.at("check");
        match self {
            Self::None => Ok(()),
            Self::Ttl { ttl } => {
                duration_in_range("ttl", *ttl, Duration::from_secs(1), ONE_DAY).map_err(at)
            }
            Self::Tcp {
                interval,
                timeout,
                failures_before_critical,
                successes_before_passing,
            }
            | Self::Http {
                interval,
                timeout,
                failures_before_critical,
                successes_before_passing,
                ..
            } => {
                duration_in_range("interval", *interval, Duration::from_millis(100), ONE_DAY)
                    .map_err(at)?;
                duration_in_range("timeout", *timeout, Duration::from_millis(1), *interval)
                    .map_err(at)?;
                int_in_range(
                    "failures_before_critical",
                    *failures_before_critical,
                    1,
                    100,
                )
                .map_err(at)?;
                int_in_range(
                    "successes_before_passing",
                    *successes_before_passing,
                    1,
                    100,
                )
                .map_err(at)?;
                if let Self::Http { path, .. } = self {
                    // Characters a request target may carry as they are (RFC 3986 unreserved,
                    // sub-delims, ':', '@', '/', '?', '%'): anything else would fail every probe.
                    let allowed =
                        |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?%".contains(c);
                    let plain = path.starts_with('/')
                        && !path.starts_with("//")
                        && path.chars().all(allowed)
                        && path.len() <= 1024;
                    if !plain {
                        return Err(ConfigError::new(
                            "check.path",
                            "an absolute path such as /health (no scheme, host or fragment)",
                            format!("{path:?}"),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// One running copy of a service, as registered: where it listens, how to tell it apart,
/// and its health. Mirrors a Consul service entry.
///
/// ```
/// use meshkit::discovery::{Health, HealthCheck, Instance};
/// use std::time::Duration;
///
/// let instance = Instance::builder("users", "10.0.0.7", 8080)
///     .tag("v2")
///     .metadata("version", "2.4.1")
///     .zone("eu-west-1a")
///     .weight(3)
///     .check(HealthCheck::Ttl { ttl: Duration::from_secs(10) })
///     .deregister_after(Duration::from_secs(60))
///     .build()?;
/// assert_eq!(instance.health, Health::Passing);
/// assert_eq!(instance.authority(), "10.0.0.7:8080");
///
/// let bad = Instance::builder("Users!", "10.0.0.7", 8080).build().unwrap_err();
/// assert_eq!(bad.field(), "service");
/// # Ok::<(), meshkit::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Unique id, fresh for each registration unless set.
    pub id: InstanceId,
    /// The service it belongs to: `[a-z0-9][a-z0-9.-]{0,62}`.
    pub service: String,
    /// An IP address or a DNS name.
    pub host: String,
    /// In `1..=65535`.
    pub port: u16,
    /// Free-form labels (`"v2"`, `"canary"`), at most 64.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form key/values, at most 64 entries of at most 512 bytes each.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Relative share of traffic for weighted balancing, in `[1, 10000]`. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
    /// Locality (an availability zone), if known.
    #[serde(default)]
    pub zone: Option<String>,
    /// How the registry learns its health.
    #[serde(default)]
    pub check: HealthCheck,
    /// Remove the instance once it has been `Critical` this long (as Consul's
    /// `DeregisterCriticalServiceAfter`), in `[1s, 1day]`. Default never.
    #[serde(default, with = "crate::duration::option")]
    pub deregister_after: Option<Duration>,
    /// Its current health.
    #[serde(default)]
    pub health: Health,
}

impl Instance {
    /// Starts an instance of `service` listening on `host:port`.
    pub fn builder(
        service: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> InstanceBuilder {
        InstanceBuilder {
            instance: Instance {
                id: InstanceId::new(),
                service: service.into(),
                host: host.into(),
                port,
                tags: Vec::new(),
                metadata: BTreeMap::new(),
                weight: 1,
                zone: None,
                check: HealthCheck::None,
                deregister_after: None,
                health: Health::Unknown,
            },
            health: None,
        }
    }

    /// `host:port`, with an IPv6 host in brackets: what a client connects to.
    pub fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    /// Checks every field, returning the first invalid one.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field (`service`, `host`, `port`, `metadata`, `weight`,
    /// `check.interval`, ...) and what it must be.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_service_name(&self.service)?;
        if !is_host(&self.host) {
            return Err(ConfigError::new(
                "host",
                "an IP address or a DNS name",
                format!("{:?}", self.host),
            ));
        }
        int_in_range("port", self.port, 1, 65535)?;
        if self.tags.len() > MAX_TAGS
            || self
                .tags
                .iter()
                .any(|t| t.is_empty() || t.len() > MAX_METADATA_LEN)
        {
            return Err(ConfigError::new(
                "tags",
                format!("at most {MAX_TAGS} non-empty tags of at most {MAX_METADATA_LEN} bytes"),
                format!("{} tags", self.tags.len()),
            ));
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES
            || self.metadata.iter().any(|(k, v)| {
                k.is_empty() || k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN
            })
        {
            return Err(ConfigError::new(
                "metadata",
                format!(
                    "at most {MAX_METADATA_ENTRIES} entries, keys non-empty, keys and values at most {MAX_METADATA_LEN} bytes"
                ),
                format!("{} entries", self.metadata.len()),
            ));
        }
        if let Some(scheme) = self.metadata.get("scheme") {
            // What an HTTP endpoint sends the instance's requests with.
            if scheme != "http" && scheme != "https" {
                return Err(ConfigError::new(
                    "metadata.scheme",
                    "\"http\" or \"https\"",
                    format!("{scheme:?}"),
                ));
            }
            // The HTTP check speaks plain HTTP/1: against a TLS port it would fail every
            // time, and the instance would never pass. Refused here rather than found out
            // as an instance that never serves.
            if scheme == "https" && matches!(self.check, HealthCheck::Http { .. }) {
                return Err(ConfigError::new(
                    "check",
                    "a TCP check, a TTL check or none for an https instance (the HTTP check \
                     does not speak TLS)",
                    "an HTTP check",
                ));
            }
        }
        int_in_range("weight", self.weight, 1, 10_000)?;
        if let Some(after) = self.deregister_after {
            duration_in_range("deregister_after", after, Duration::from_secs(1), ONE_DAY)?;
        }
        if let Some(zone) = &self.zone {
            if zone.is_empty() || zone.len() > 128 {
                return Err(ConfigError::new(
                    "zone",
                    "1 to 128 bytes",
                    format!("{zone:?}"),
                ));
            }
        }
        self.check.validate()
    }
}

/// Checks a service name against `[a-z0-9][a-z0-9.-]{0,62}`.
pub(crate) fn validate_service_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(ConfigError::new(
            "service",
            "[a-z0-9][a-z0-9.-]{0,62}",
            format!("{name:?}"),
        ))
    }
}

fn is_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    // A DNS name: dot-separated labels of letters, digits and inner hyphens.
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Builds an [`Instance`]; [`build`](Self::build) validates it.
#[derive(Clone, Debug)]
#[must_use]
pub struct InstanceBuilder {
    instance: Instance,
    health: Option<Health>,
}

impl InstanceBuilder {
    /// Uses this id instead of a fresh one (re-registering the same instance).
    pub fn id(mut self, id: InstanceId) -> Self {
        self.instance.id = id;
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.instance.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry. The key `scheme` (`"http"` or `"https"`, checked when built;
    /// an `https` instance cannot have the HTTP health check, which does not speak TLS)
    /// tells HTTP endpoints which scheme to send the instance's requests with.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.instance.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the weight (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.instance.weight = weight;
        self
    }

    /// Sets the zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.instance.zone = Some(zone.into());
        self
    }

    /// Sets the health check (default none).
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.instance.check = check;
        self
    }

    /// Removes the instance once it has been critical this long.
    pub fn deregister_after(mut self, after: Duration) -> Self {
        self.instance.deregister_after = Some(after);
        self
    }

    /// Starts with this health instead of the check's initial one.
    pub fn health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    /// Validates and returns the instance.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field.
    pub fn build(mut self) -> Result<Instance, ConfigError> {
        self.instance.health = self
            .health
            .unwrap_or_else(|| self.instance.check.initial_health());
        self.instance.validate()?;
        Ok(self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(builder: InstanceBuilder) -> String {
        builder.build().unwrap_err().to_string()
    }

    #[test]
    fn names_hosts_and_ports_are_checked() {
        assert!(Instance::builder("users-v2.eu", "users.internal", 80)
            .build()
            .is_ok());
        assert!(Instance::builder("a", "::1", 1).build().is_ok());
        assert_eq!(
            error(Instance::builder("-users", "10.0.0.1", 80)),
            "service must be [a-z0-9][a-z0-9.-]{0,62}, got \"-users\""
        );
        assert!(error(Instance::builder("a".repeat(64), "10.0.0.1", 80)).starts_with("service"));
        assert!(error(Instance::builder("users", "http://evil", 80)).starts_with("host"));
        assert_eq!(
            error(Instance::builder("users", "10.0.0.1", 0)),
            "port must be in [1, 65535], got 0"
        );
    }

    #[test]
    fn http_check_paths_cannot_name_another_host() {
        let check = |path: &str| {
            Instance::builder("users", "10.0.0.1", 80)
                .check(HealthCheck::Http {
                    path: path.into(),
                    interval: Duration::from_secs(5),
                    timeout: Duration::from_secs(1),
                    failures_before_critical: 1,
                    successes_before_passing: 1,
                })
                .build()
        };
        assert!(check("/health").is_ok());
        for bad in [
            "http://169.254.169.254/",
            "//evil.example/x",
            "health",
            "/a b",
        ] {
            assert_eq!(check(bad).unwrap_err().field(), "check.path", "{bad}");
        }
    }

    #[test]
    fn metadata_is_bounded() {
        let mut builder = Instance::builder("users", "10.0.0.1", 80);
        for i in 0..65 {
            builder = builder.metadata(format!("k{i}"), "v");
        }
        assert_eq!(builder.build().unwrap_err().field(), "metadata");
    }

    #[test]
    fn round_trips_through_json() {
        let instance = Instance::builder("users", "10.0.0.1", 8080)
            .tag("v2")
            .check(HealthCheck::Ttl {
                ttl: Duration::from_secs(10),
            })
            .deregister_after(Duration::from_secs(60))
            .build()
            .unwrap();
        let text = serde_json::to_string(&instance).unwrap();
        assert!(text.contains(r#""kind":"ttl""#), "{text}");
        assert_eq!(serde_json::from_str::<Instance>(&text).unwrap(), instance);
    }
}
