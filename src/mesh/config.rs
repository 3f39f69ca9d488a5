//! [`MeshConfig`]: one file for every service's policies, with environment overrides.

use crate::balance::BalanceConfig;
use crate::breaker::BreakerConfig;
use crate::config::{duration_in_range, ConfigError};
use crate::retry::RetryConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Policies for every service a mesh calls, usually read from TOML:
///
/// ```toml
/// # What every service starts from; each section and field is optional.
/// [defaults.retry]
/// max_attempts = 3
///
/// [services.users]
/// timeout = "2s"
///
/// [services.users.breaker]
/// failure_rate = 0.5
/// window = { kind = "time", duration = "30s" }
///
/// [services.users.balance]
/// picker = "peak_ewma"
/// ejection = { consecutive_failures = 5 }
/// ```
///
/// A service's table is laid over `defaults` key by key (`services.users.retry.deadline`
/// keeps `defaults.retry.max_attempts`; a table with a `kind`, such as a breaker `window`,
/// replaces the default's whole); a service with no table uses `defaults`. Every key
/// is checked: an unknown one is an error naming its path, as is a value out of range
/// (`services.users.breaker.failure_rate: must be in (0, 1], got 1.5`).
///
/// The layering happens when a config is read. In code, each [`ServiceConfig`] in
/// `services` is whole: changing `defaults` afterwards (say, on `mesh.config()` before a
/// [`reload`](super::Mesh::reload)) changes only the services without an entry; to change a
/// setting everywhere, change it in each entry too, or edit the TOML and read it again.
///
/// [`from_toml`](Self::from_toml), [`from_toml_with_env`](Self::from_toml_with_env) and
/// [`load`](Self::load) give the error as a [`MeshConfigError`]. The `Deserialize`
/// implementation does the same layering and checks from any self-describing serde format (a
/// section of a larger application config, JSON, YAML), with the error's text as a custom
/// error of that format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, remote = "Self")]
pub struct MeshConfig {
    /// The policies of a service with no table of its own, and under every service's table.
    pub defaults: ServiceConfig,
    /// Each service's policies, by service name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// How long [`Mesh::shutdown`](super::Mesh::shutdown) waits for calls in flight, in
    /// `[0s, 10min]`. Default `"10s"`.
    #[serde(with = "crate::duration")]
    pub shutdown_timeout: Duration,
}

/// One service's client policies: the layers of its stack, from the endpoint up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Picker, fail-fast and outlier ejection (reloads: a change gives the service's clients
    /// a new balancer, endpoints rediscovered and loads and ejections started afresh).
    /// Default: [`BalanceConfig`]'s defaults, except that a mesh ejects outliers unless told
    /// not to: `ejection` defaults to [`EjectionConfig`](crate::balance::EjectionConfig)'s
    /// defaults (5 failures in a row), and `ejection = "none"` turns it off.
    pub balance: BalanceConfig,
    /// The breaker over the balanced endpoints (reloads: a change gives the service a new
    /// breaker).
    pub breaker: BreakerConfig,
    /// Retries over the breaker (reloads; the budget is kept unless its terms change).
    pub retry: RetryConfig,
    /// The whole call's time limit, tries and waits included, in `[1ms, 1h]`; `"none"` (or
    /// `null` in formats that have it) for none.
    /// Default `"10s"`. Counted from the call's first poll on (waiting in `poll_ready` before
    /// it is not counted), a call past it fails with tower's `Elapsed`, which
    /// `http::error_status` and `ErrorResponseLayer` turn into a 504. `retry.deadline` bounds
    /// the retry layer alone: it stops sending tries and, where the error type can carry it,
    /// cuts the running try with `TimedOut`; with both set, the shorter one ends the call
    /// first. A retry wait (a server's `Retry-After`, or the backoff) that would end past
    /// this limit is not waited for: the last try's response or error is returned when it
    /// comes, rather than a timeout that loses it.
    #[serde(with = "crate::duration::option")]
    pub timeout: Option<Duration>,
    /// What HTTP clients may send again (reloads: a change gives the service's HTTP clients a
    /// new balancer, as their endpoints are made from it, and new retry rules).
    pub http: HttpConfig,
}

/// What an HTTP client of the mesh may send again, and how it addresses instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Request bodies up to this many bytes may be sent again by a retry; larger ones are
    /// sent once. [`Mesh::buffered_client`](super::Mesh::buffered_client) reads streamed
    /// bodies into memory up to this size; a body already in memory (a `reqwest` body of
    /// bytes, a `String`, `Bytes`, `Full`) is not copied for a retry when it is larger. In
    /// `[0, 67108864]` (64 MiB). Default `65536`.
    pub body_limit: usize,
    /// Retry every method, not only idempotent ones (for servers that deduplicate, with an
    /// idempotency key say). Default `false`.
    pub retry_all_methods: bool,
    /// Give a plain-`http` HTTP/1 request without a `Host` header the picked instance's
    /// `host:port`, made once per instance (see [`Endpoint`](crate::http::Endpoint)) instead
    /// of derived by the client for each request. Turn it off for a leaf that speaks HTTP/2
    /// over plain `http` by prior knowledge and sends requests not marked
    /// `Version::HTTP_2`. Default `true`.
    pub set_host: bool,
    /// The response statuses a retry sends the request again for (each in `[100, 999]`), in
    /// place of the default: 429 and every 5xx (see
    /// [`HttpClassifier`](crate::http::HttpClassifier)). `[408, 429, 502, 503, 504]`, say.
    /// Breakers still count every 5xx, and only 5xx, as failures.
    pub retry_statuses: Option<Vec<u16>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            retry_all_methods: false,
            set_host: true,
            retry_statuses: None,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            defaults: ServiceConfig::default(),
            services: BTreeMap::new(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            balance: BalanceConfig {
                ejection: Some(crate::balance::EjectionConfig::default()),
                ..BalanceConfig::default()
            },
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
            timeout: Some(Duration::from_secs(10)),
            http: HttpConfig::default(),
        }
    }
}

impl ServiceConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field by its path within the service (`retry.max_attempts`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.balance.validate().map_err(|e| e.at("balance"))?;
        self.breaker.validate().map_err(|e| e.at("breaker"))?;
        self.retry.validate().map_err(|e| e.at("retry"))?;
        crate::config::int_in_range("http.body_limit", self.http.body_limit, 0, 64 << 20)?;
        for (index, status) in self.http.retry_statuses.iter().flatten().enumerate() {
            let field = format!("http.retry_statuses[{index}]");
            crate::config::int_in_range(&field, *status, 100, 999)?;
        }
        if let Some(timeout) = self.timeout {
            duration_in_range(
                "timeout",
                timeout,
                Duration::from_millis(1),
                Duration::from_secs(3_600),
            )?;
        }
        Ok(())
    }
}

impl MeshConfig {
    /// The policies of `service`: its own, or the defaults.
    pub fn service(&self, service: &str) -> &ServiceConfig {
        self.services.get(service).unwrap_or(&self.defaults)
    }

    /// Checks every field of the defaults and of every service.
    ///
    /// # Errors
    /// The first invalid value, by its full path (`services.users.breaker.failure_rate`).
    pub fn validate(&self) -> Result<(), MeshConfigError> {
        duration_in_range(
            "shutdown_timeout",
            self.shutdown_timeout,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        self.defaults
            .validate()
            .map_err(|e| MeshConfigError::Invalid(e.at("defaults")))?;
        for (name, service) in &self.services {
            service
                .validate()
                .map_err(|e| MeshConfigError::Invalid(e.at(&format!("services.{name}"))))?;
        }
        Ok(())
    }

    /// Reads a config from TOML text, then checks it.
    ///
    /// # Errors
    /// See [`MeshConfigError`].
    pub fn from_toml(text: &str) -> Result<Self, MeshConfigError> {
        Self::from_toml_with_env(text, std::iter::empty::<(String, String)>())
    }

    /// Reads a config from TOML text with overrides from environment variables, then checks
    /// it. Variables named `MESHKIT_` followed by a path whose parts are joined by `__` set
    /// that key (`MESHKIT_SERVICES__USERS__RETRY__MAX_ATTEMPTS=5` sets
    /// `services.users.retry.max_attempts`; names are lowercased, and a service of the file
    /// whose name has `-` or `.` is named with `_`: `USER_API` for `user-api`). A value is
    /// read as TOML when it is one (`5`, `true`, `0.5`, `["a"]`) and as a string otherwise
    /// (`2s`). Other variables are ignored, as are `MESHKIT_` names of one word (no `__`)
    /// other than `MESHKIT_SHUTDOWN_TIMEOUT`, such as a `MESHKIT_CONFIG` naming the file.
    ///
    /// ```
    /// use meshkit::MeshConfig;
    ///
    /// let env = [("MESHKIT_SERVICES__USERS__RETRY__MAX_ATTEMPTS", "5")];
    /// let config = MeshConfig::from_toml_with_env("[services.users]\ntimeout = \"2s\"", env).unwrap();
    /// assert_eq!(config.service("users").retry.max_attempts, 5);
    /// ```
    ///
    /// # Errors
    /// See [`MeshConfigError`].
    pub fn from_toml_with_env<K, V>(
        text: &str,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, MeshConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut root: toml::Table =
            toml::from_str(text).map_err(|e| MeshConfigError::Syntax(located(text, &e)))?;
        for (name, value) in env {
            if !is_config_variable(name.as_ref()) {
                continue;
            }
            let path = &name.as_ref()["MESHKIT_".len()..];
            set_path(&mut root, path, value.as_ref())?;
        }
        // JSON, which the config passes through, has no infinity or NaN: each such value
        // (TOML's `inf`, `nan`) is read as a stand-in, and put back in the error that names it.
        let mut non_finite = Vec::new();
        take_non_finite(&mut root, "", &mut non_finite);
        let root =
            serde_json::to_value(root).map_err(|e| MeshConfigError::Syntax(e.to_string()))?;
        match (Self::from_value(root), non_finite.first()) {
            (Ok(config), None) => Ok(config),
            // A stand-in within its field's range (no field has one that wide): refused
            // all the same.
            (Ok(_), Some((path, value))) => Err(MeshConfigError::Parse {
                path: path.clone(),
                message: format!("must be a finite number, got {value}"),
            }),
            (Err(error), _) => Err(restore_non_finite(error, &non_finite)),
        }
    }

    /// Lays the services over the defaults, reads the fields (naming the path of a bad one),
    /// then checks the values.
    fn from_value(mut root: serde_json::Value) -> Result<Self, MeshConfigError> {
        if let serde_json::Value::Object(root) = &mut root {
            eject_by_default(root);
            lay_services_over_defaults(root);
        }
        let mut track = serde_path_to_error::Track::new();
        let fields = serde_path_to_error::Deserializer::new(root, &mut track);
        // The fields as they are, derived (`remote = "Self"`): this type's own `Deserialize`
        // is this function.
        let config = MeshConfig::deserialize(fields).map_err(|e| {
            let message = e.to_string();
            MeshConfigError::Parse {
                path: with_unknown_field(track.path().to_string(), &message),
                message,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file with overrides from this process's environment (see
    /// [`from_toml_with_env`](Self::from_toml_with_env)).
    ///
    /// # Errors
    /// The file cannot be read, or see [`MeshConfigError`].
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, MeshConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| MeshConfigError::Io(format!("{}: {e}", path.display())))?;
        // `std::env::vars` panics on a variable that is not UTF-8: such variables are read
        // here only to refuse one of ours.
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|name| is_config_variable(name)) else {
                continue;
            };
            let Some(value) = value.to_str() else {
                return Err(MeshConfigError::Parse {
                    path: name.to_string(),
                    message: "the variable's value is not UTF-8".into(),
                });
            };
            env.push((name.to_string(), value.to_string()));
        }
        Self::from_toml_with_env(&text, env)
    }
}

/// What stands in for a non-finite float on its way through JSON: negative, so out of every
/// field's range, with a short rendering to find in the error.
const NON_FINITE: f64 = -123_456_789.25;

/// Replaces each non-finite float under `table` (at `path`) with [`NON_FINITE`], noting its
/// path and value in `found`.
fn take_non_finite(table: &mut toml::Table, path: &str, found: &mut Vec<(String, f64)>) {
    fn visit(value: &mut toml::Value, path: String, found: &mut Vec<(String, f64)>) {
        match value {
            toml::Value::Float(float) if !float.is_finite() => {
                found.push((path, *float));
                *float = NON_FINITE;
            }
            toml::Value::Table(table) => take_non_finite(table, &path, found),
            toml::Value::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    visit(item, format!("{path}[{index}]"), found);
                }
            }
            _ => {}
        }
    }
    for (key, value) in table.iter_mut() {
        let path = match path {
            "" => key.clone(),
            parent => format!("{parent}.{key}"),
        };
        visit(value, path, found);
    }
}

/// `error` with the non-finite value it names written back in place of [`NON_FINITE`].
fn restore_non_finite(error: MeshConfigError, found: &[(String, f64)]) -> MeshConfigError {
    let stand_in = NON_FINITE.to_string();
    // The value of the path named, or (a `defaults` value laid over a service) of the one
    // whose path ends as the named one's does after its service.
    let value = |path: &str| {
        let own = |candidate: &str| candidate.splitn(3, '.').nth(2).map(str::to_owned);
        found
            .iter()
            .find(|(at, _)| at == path)
            .or_else(|| {
                found
                    .iter()
                    .find(|(at, _)| own(at).is_some() && own(at) == own(path))
            })
            .or(found.first())
            .map(|(_, value)| value.to_string())
    };
    match error {
        MeshConfigError::Invalid(e) if e.got() == stand_in => match value(e.field()) {
            Some(got) => MeshConfigError::Invalid(ConfigError::new(e.field(), e.expected(), got)),
            None => MeshConfigError::Invalid(e),
        },
        MeshConfigError::Parse { path, message } if message.contains(&stand_in) => {
            let got = value(&path).unwrap_or_default();
            MeshConfigError::Parse {
                message: message.replace(&stand_in, &got),
                path,
            }
        }
        error => error,
    }
}

/// The path of an error about an unknown key: serde names the key in its message but, inside
/// a table read as a whole (a breaker window, tagged by its `kind`), tracks only the table.
fn with_unknown_field(path: String, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return path;
    };
    if path == field || path.ends_with(&format!(".{field}")) {
        path
    } else if path.is_empty() || path == "." {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Whether the environment variable `name` sets a config key: `MESHKIT_` and a path. One word
/// with no `__` is a path only for a top-level value; others (such as a `MESHKIT_CONFIG`
/// naming the file) are not this config's business.
fn is_config_variable(name: &str) -> bool {
    name.strip_prefix("MESHKIT_")
        .is_some_and(|path| path.contains("__") || path.eq_ignore_ascii_case("shutdown_timeout"))
}

/// A TOML syntax error as `line L, column C: what` (toml's own rendering spans several
/// lines, with a copy of the offending line).
fn located(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            let what = error.message().trim_end().replace('\n', "; ");
            format!("line {line}, column {column}: {what}")
        }
        None => error.message().trim_end().replace('\n', "; "),
    }
}

/// Why a [`MeshConfig`] was refused.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum MeshConfigError {
    /// Not TOML: where, and what is wrong (`line 3, column 9: expected ...`).
    Syntax(String),
    /// The file could not be read: its path and why.
    Io(String),
    /// A key that does not exist, or a value of the wrong type: its path and what is wrong
    /// (`services.users.retry.max_attemps: unknown field ...`).
    Parse {
        /// The key's dotted path.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value out of its range.
    Invalid(ConfigError),
}

impl MeshConfigError {
    /// The dotted path of the offending key, when there is one.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::Syntax(_) | Self::Io(_) => None,
            Self::Parse { path, .. } => Some(path),
            Self::Invalid(e) => Some(e.field()),
        }
    }
}

impl From<ConfigError> for MeshConfigError {
    fn from(error: ConfigError) -> Self {
        Self::Invalid(error)
    }
}

impl fmt::Display for MeshConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax(message) => write!(f, "invalid TOML: {message}"),
            Self::Io(message) => write!(f, "cannot read the config file {message}"),
            Self::Parse { path, message } => write!(f, "{path}: {message}"),
            Self::Invalid(e) => write!(
                f,
                "{}: must be {}, got {}",
                e.field(),
                e.expected(),
                e.got()
            ),
        }
    }
}

impl std::error::Error for MeshConfigError {}

/// Sets the key at `path` (`SERVICES__USERS__RETRY__MAX_ATTEMPTS`) to `value`, creating
/// tables on the way.
fn set_path(root: &mut toml::Table, path: &str, value: &str) -> Result<(), MeshConfigError> {
    let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
    let env_name = || format!("MESHKIT_{path}");
    if keys.iter().any(String::is_empty) {
        return Err(MeshConfigError::Parse {
            path: env_name(),
            message: "an empty key in the variable's name".into(),
        });
    }
    let mut keys = keys;
    if keys.len() > 1 && keys[0] == "services" {
        keys[1] = service_key(root, &keys[1]);
    }
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut table = root;
    for (depth, key) in parents.iter().enumerate() {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(MeshConfigError::Parse {
                    path: keys[..=depth].join("."),
                    message: format!(
                        "{} sets a key inside a value that is not a table",
                        env_name()
                    ),
                })
            }
        };
    }
    table.insert(last.clone(), env_value(value));
    Ok(())
}

/// The service a variable's name part means: a service of the file whose name is `part`
/// once `-` and `.` are written `_` (a variable's name cannot hold them:
/// `MESHKIT_SERVICES__USER_API__TIMEOUT` sets `services.user-api.timeout`), else `part`.
fn service_key(root: &toml::Table, part: &str) -> String {
    let spelled = |name: &str| name.replace(['-', '.'], "_");
    let services = root.get("services").and_then(toml::Value::as_table);
    match services {
        Some(services) if !services.contains_key(part) => services
            .keys()
            .find(|name| spelled(name) == part)
            .cloned()
            .unwrap_or_else(|| part.to_string()),
        _ => part.to_string(),
    }
}

/// An environment value as TOML when it parses as a TOML value, else as a string.
fn env_value(value: &str) -> toml::Value {
    format!("value = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

type Table = serde_json::Map<String, serde_json::Value>;

/// A mesh ejects outliers unless told not to (`ejection = "none"`): `defaults.balance`
/// gets an `ejection` table of default values when it has no `ejection` key, and services
/// take it from there.
fn eject_by_default(root: &mut Table) {
    // A `defaults` or `balance` that is not a table is left for its field's error to name.
    let defaults = root
        .entry("defaults")
        .or_insert_with(|| serde_json::json!({}));
    let Some(defaults) = defaults.as_object_mut() else {
        return;
    };
    let balance = defaults
        .entry("balance")
        .or_insert_with(|| serde_json::json!({}));
    let Some(balance) = balance.as_object_mut() else {
        return;
    };
    balance
        .entry("ejection")
        .or_insert_with(|| serde_json::json!({}));
}

/// Lays each service's table over a copy of `defaults`, key by key.
fn lay_services_over_defaults(root: &mut Table) {
    let Some(serde_json::Value::Object(defaults)) = root.get("defaults").cloned() else {
        return;
    };
    if let Some(serde_json::Value::Object(services)) = root.get_mut("services") {
        for (_, service) in services.iter_mut() {
            if let serde_json::Value::Object(own) = service {
                let mut merged = defaults.clone();
                merge(&mut merged, std::mem::take(own));
                *own = merged;
            }
        }
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced. A table with a
/// `kind` names one variant of a choice (a breaker window, a backoff), whose fields belong to
/// that variant alone: it replaces the base's whole.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            // A breaker window's fields belong to one kind each (`size`, `duration`): a
            // window always replaces the base's whole.
            (Some(serde_json::Value::Object(inner)), serde_json::Value::Object(value))
                if !value.contains_key("kind") && key != "window" =>
            {
                merge(inner, value)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

impl Serialize for MeshConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The derived fields (`remote = "Self"`).
        MeshConfig::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for MeshConfig {
    /// Lays each service's table over `defaults` and checks every value, as
    /// [`from_toml`](Self::from_toml) does.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let root = serde_json::Value::deserialize(deserializer)?;
        Self::from_value(root).map_err(serde::de::Error::custom)
    }
}
