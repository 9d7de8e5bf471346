//! Where a PIN comes from: a 0600 file, a systemd credential, an explicitly named environment
//! variable, or (CLI only) an interactive prompt without echo.
//!
//! Owns reading and validating PIN sources. Blocking file I/O: call it at start-up or from a
//! signer thread, never on the async runtime's hot path. PINs are returned as
//! [`secrecy::SecretString`] and never appear in errors or logs.

use std::io::IsTerminal as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// A configured source of a PIN. The PIN itself is never in the config.
///
/// In TOML: `{ file = "/etc/tm-agent/pin" }`, `{ credential = "pin" }`, `{ env = "NAME" }`
/// or `"prompt"`. Deserialization never quotes a rejected value back: someone who wrote the
/// PIN itself into the config must not find it echoed in an error, a log or the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// A file holding the PIN (trailing newline ignored); must be mode 0600 or stricter.
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
    /// An environment variable, named explicitly in the config.
    Env(String),
    /// Ask on the terminal (CLI only; the daemon refuses it).
    Prompt,
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "file {}", p.display()),
            PinSource::Credential(n) => write!(f, "systemd credential {n}"),
            PinSource::Env(v) => write!(f, "environment variable {v}"),
            PinSource::Prompt => write!(f, "terminal prompt"),
        }
    }
}

impl PinSource {
    /// Checks that a source given by the user names a place and does not look like a PIN
    /// typed in the wrong field: an environment variable's name (letters, digits and `_`,
    /// not starting with a digit), a credential's name (a letter or `_` first, then any
    /// printable ASCII but `/` and `:`), or, from the config (`absolute_file`), an absolute
    /// file path.
    /// The refusal is fixed text, to follow the field or flag's name: a name that fails is
    /// never quoted back, so a PIN typed there cannot reach an error, a log or the journal.
    pub fn check_shape(&self, absolute_file: bool) -> Result<(), &'static str> {
        let starts_like_a_name =
            |n: &str| n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        match self {
            PinSource::Env(name)
                if !starts_like_a_name(name)
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Err(
                    "must be the name of an environment variable (letters, digits and _, not \
                     starting with a digit), never the PIN itself",
                )
            }
            PinSource::Credential(name)
                if !starts_like_a_name(name)
                    || name.len() > 255
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_graphic() && c != '/' && c != ':') =>
            {
                Err(
                    "must be the name of a systemd credential (a letter or _ first; no spaces, \
                     / or :), never the PIN itself",
                )
            }
            PinSource::File(path) if absolute_file && !path.is_absolute() => {
                Err("must be the absolute path of the PIN file, never the PIN itself")
            }
            _ => Ok(()),
        }
    }
}

/// Whether a deserialization message is one of [`PinSource`]'s own refusals: fixed text that
/// quotes nothing, so it may be shown where serde's messages (which quote values) are not.
/// Each starts with `pin`; serde's own start with `invalid`, `unknown`, `missing`, ….
pub fn is_pin_source_refusal(message: &str) -> bool {
    message.starts_with("pin")
}

const PIN_SHAPE: &str = "pin must name where the PIN is, never the PIN itself: \
    { credential = \"pin\" }, { file = \"/etc/tm-agent/pin\" }, { env = \"NAME\" } or \"prompt\"";

impl<'de> Deserialize<'de> for PinSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PinSourceVisitor)
    }
}

struct PinSourceVisitor;

/// The string value of `pin.<field>`. Anything else is refused with fixed text: serde's own
/// message would quote the value, which may be the PIN typed in the wrong place.
struct Name(&'static str);

impl<'de> serde::de::DeserializeSeed<'de> for Name {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl Name {
    fn refuse<E: serde::de::Error>(&self) -> E {
        E::custom(format!(
            "pin.{} must be a string naming where the PIN is, never the PIN itself",
            self.0
        ))
    }
}

impl<'de> serde::de::Visitor<'de> for Name {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a string for pin.{}", self.0)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
        Err(self.refuse())
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
        Err(self.refuse())
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
        Err(self.refuse())
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
        Err(self.refuse())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.refuse())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.refuse())
    }
}

impl<'de> serde::de::Visitor<'de> for PinSourceVisitor {
    type Value = PinSource;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(PIN_SHAPE)
    }

    // Every rejection below uses `custom` with fixed text: serde's default messages would
    // quote the value, which may be the PIN.
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PinSource, E> {
        if v == "prompt" {
            Ok(PinSource::Prompt)
        } else {
            Err(E::custom(PIN_SHAPE))
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<PinSource, A::Error> {
        use serde::de::Error as _;
        let mut found: Option<PinSource> = None;
        while let Some(key) = map.next_key::<String>()? {
            let source = match key.as_str() {
                "file" => PinSource::File(map.next_value_seed(Name("file"))?.into()),
                "credential" => PinSource::Credential(map.next_value_seed(Name("credential"))?),
                "env" => PinSource::Env(map.next_value_seed(Name("env"))?),
                _ => {
                    // Skip the value unread so that it cannot end up in the message.
                    map.next_value::<serde::de::IgnoredAny>()?;
                    return Err(A::Error::custom(PIN_SHAPE));
                }
            };
            source
                .check_shape(true)
                .map_err(|why| A::Error::custom(format!("pin.{key} {why}")))?;
            if found.replace(source).is_some() {
                return Err(A::Error::custom(
                    "pin: give exactly one of file, credential or env",
                ));
            }
        }
        found.ok_or_else(|| A::Error::custom(PIN_SHAPE))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<PinSource, E> {
        Err(E::custom(PIN_SHAPE))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<PinSource, E> {
        Err(E::custom(PIN_SHAPE))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<PinSource, E> {
        Err(E::custom(PIN_SHAPE))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<PinSource, E> {
        Err(E::custom(PIN_SHAPE))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<PinSource, A::Error> {
        use serde::de::Error as _;
        Err(A::Error::custom(PIN_SHAPE))
    }
}

/// Why a PIN could not be read. Never carries the PIN.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot read PIN file {path}: {source}")]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PIN file {path} has mode {mode:04o}: make it readable by its owner only (chmod 600 {path})")]
    FileTooOpen { path: PathBuf, mode: u32 },
    #[error("PIN file {path} belongs to uid {owner}: it must belong to root or to the user tm-agent runs as (chown it)")]
    FileOwner { path: PathBuf, owner: u32 },
    #[error("PIN credential {name}: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential=, or use a pin file)")]
    NoCredentialsDirectory { name: String },
    #[error("PIN credential {name} is not among the service's credentials ({path}: {source}): load it in the unit with LoadCredential={name}:/path/to/pin-file (the shipped units load only `pin`)")]
    CredentialMissing {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not quoted: a name that is not one may be the PIN itself.
    #[error("the PIN credential's name is not a plain file name (it must not be empty, . or .., nor hold a /)")]
    BadCredentialName,
    #[error("PIN environment variable {name} is not set or not UTF-8")]
    EnvMissing { name: String },
    #[error("no PIN source given and standard input is not a terminal: give --pin-file, --pin-env or --pin-credential (in the config: pin = {{ file = … }}, {{ env = … }} or {{ credential = … }})")]
    NoTerminal,
    #[error("PIN prompt failed: {0}")]
    Prompt(std::io::Error),
    #[error("the PIN from {source_name} is empty")]
    Empty { source_name: String },
}

/// Reads the PIN from `source`. `prompt_label` is shown when prompting.
pub fn read_pin(source: &PinSource, prompt_label: &str) -> Result<SecretString, PinError> {
    let text = match source {
        PinSource::File(path) => read_private_file(path)?,
        PinSource::Credential(name) => {
            read_credential(std::env::var_os("CREDENTIALS_DIRECTORY"), name)?
        }
        PinSource::Env(name) => {
            std::env::var(name).map_err(|_| PinError::EnvMissing { name: name.clone() })?
        }
        PinSource::Prompt => {
            if !std::io::stdin().is_terminal() {
                return Err(PinError::NoTerminal);
            }
            rpassword::prompt_password(format!("{prompt_label}: ")).map_err(PinError::Prompt)?
        }
    };
    let pin = zeroize::Zeroizing::new(text);
    let trimmed = pin.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(PinError::Empty {
            source_name: source.to_string(),
        });
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Reads systemd credential `name` from `dir` (the service's `$CREDENTIALS_DIRECTORY`).
fn read_credential(dir: Option<std::ffi::OsString>, name: &str) -> Result<String, PinError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(PinError::BadCredentialName);
    }
    let dir = dir.ok_or_else(|| PinError::NoCredentialsDirectory { name: name.into() })?;
    // systemd makes credentials readable by the service only; don't second-guess its modes
    // (they are 0400 under a read-only mount).
    let path = Path::new(&dir).join(name);
    std::fs::read_to_string(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            PinError::CredentialMissing {
                name: name.into(),
                path,
                source,
            }
        } else {
            PinError::FileUnreadable { path, source }
        }
    })
}

fn read_private_file(path: &Path) -> Result<String, PinError> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let unreadable = |source| PinError::FileUnreadable {
        path: path.to_path_buf(),
        source,
    };
    // Check the file we opened, not the path again: no window for a swap in between.
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PinError::FileTooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if meta.uid() != 0 && Some(meta.uid()) != euid {
        return Err(PinError::FileOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(unreadable)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "123456\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_pin(&PinSource::File(path.clone()), "PIN").unwrap_err();
        assert!(matches!(err, PinError::FileTooOpen { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = read_pin(&PinSource::File(path), "PIN").unwrap();
        assert_eq!(pin.expose_secret(), "123456");
    }

    #[test]
    fn empty_pin_is_refused_and_errors_hold_no_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_pin(&PinSource::File(path), "PIN"),
            Err(PinError::Empty { .. })
        ));
    }

    #[test]
    fn a_pin_written_into_the_config_is_never_echoed() {
        #[derive(Debug, Deserialize)]
        struct K {
            #[allow(dead_code)]
            pin: PinSource,
        }
        for bad in [
            r#"pin = "987654""#,
            "pin = 987654",
            r#"pin = { value = "987654" }"#,
            r#"pin = ["987654"]"#,
            "pin = { file = 987654 }",
            "pin = { env = 987654.5 }",
            r#"pin = { credential = ["987654"] }"#,
            "pin = { file = { x = 987654 } }",
        ] {
            let err = toml::from_str::<K>(bad).unwrap_err();
            let text = format!("{} {:?}", err.message(), err.message());
            assert!(!text.contains("987654"), "{bad}: {text}");
            assert!(text.contains("never the PIN itself"), "{bad}: {text}");
        }
        // A PIN typed where the name of its source goes.
        for (bad, field) in [
            r#"pin = { env = "987654" }"#,
            r#"pin = { env = "98-76-54" }"#,
            r#"pin = { credential = "987654" }"#,
            r#"pin = { credential = "9876 54" }"#,
            r#"pin = { file = "987654" }"#,
        ]
        .iter()
        .zip(["env", "env", "credential", "credential", "file"])
        {
            let err = toml::from_str::<K>(bad).unwrap_err();
            let text = format!("{} {:?}", err.message(), err.message());
            assert!(!text.contains("987654"), "{bad}: {text}");
            assert!(!text.contains("9876 54"), "{bad}: {text}");
            assert!(
                text.contains(&format!("pin.{field} must be")) && text.contains("never the PIN"),
                "{bad}: {text}"
            );
        }
        for ok in [
            r#"pin = { credential = "piv-pin" }"#,
            r#"pin = { credential = "tm-agent.pin@2" }"#,
            r#"pin = { credential = "pin+prod" }"#,
            r#"pin = { env = "_PIN_2" }"#,
        ] {
            toml::from_str::<K>(ok).unwrap();
        }
        let ok: K = toml::from_str(r#"pin = { credential = "pin" }"#).unwrap();
        assert_eq!(ok.pin, PinSource::Credential("pin".into()));
        let ok: K = toml::from_str(r#"pin = { file = "/etc/tm-agent/pin" }"#).unwrap();
        assert_eq!(ok.pin, PinSource::File("/etc/tm-agent/pin".into()));
        let ok: K = toml::from_str(r#"pin = { env = "TM_PIN" }"#).unwrap();
        assert_eq!(ok.pin, PinSource::Env("TM_PIN".into()));
        let ok: K = toml::from_str(r#"pin = "prompt""#).unwrap();
        assert_eq!(ok.pin, PinSource::Prompt);
        assert!(toml::from_str::<K>(r#"pin = { file = "/a", env = "B" }"#).is_err());
    }

    #[test]
    fn a_credential_the_unit_does_not_load_says_how_to_load_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "123456\n").unwrap();
        let pin = read_credential(Some(dir.path().into()), "pin").unwrap();
        assert_eq!(pin.as_str(), "123456\n");
        let err = read_credential(Some(dir.path().into()), "piv-pin").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PinError::CredentialMissing { .. }), "{text}");
        assert!(
            text.contains("PIN credential piv-pin is not among the service's credentials")
                && text.contains("LoadCredential=piv-pin:/path/to/pin-file"),
            "{text}"
        );
        assert!(matches!(
            read_credential(None, "pin"),
            Err(PinError::NoCredentialsDirectory { .. })
        ));
    }

    #[test]
    fn credential_names_are_plain() {
        for bad in ["", "../pin", "a/b", ".."] {
            assert!(matches!(
                read_pin(&PinSource::Credential(bad.into()), "PIN"),
                Err(PinError::BadCredentialName)
            ));
        }
    }
}
