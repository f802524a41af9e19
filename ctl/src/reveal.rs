//! Sealed values in command results: hidden as `<sealed>` by default, opened with the
//! control plane's sealing key on request.

use dbvm_protocol::seal::{SealError, Sealed, SealingKey};
use serde_json::Value;

/// What a sealed value is shown as when it is not revealed.
pub const REDACTED: &str = "<sealed>";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot open the sealed value at {path}: {error}")]
pub struct RevealError {
    /// JSON pointer to the value (`/output/password`).
    pub path: String,
    pub error: SealError,
}

/// Whether a string is meant as a sealed value (starts with the `sealed:v1:` prefix),
/// whether or not it decodes. Asks the protocol crate, which owns the prefix.
fn is_sealed(text: &str) -> bool {
    !matches!(
        Sealed::try_from(text.to_string()),
        Err(SealError::NotSealed)
    )
}

fn walk(
    value: &mut Value,
    path: &mut String,
    f: &mut dyn FnMut(&mut Value, &str) -> Result<(), RevealError>,
) -> Result<(), RevealError> {
    match value {
        Value::String(s) if is_sealed(s) => f(value, path),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                walk(item, path, f)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                path.push('/');
                // JSON pointer escaping (RFC 6901)
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                walk(item, path, f)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Replaces every sealed string in `value` by `"<sealed>"`; returns how many there were.
pub fn redact(value: &mut Value) -> usize {
    let mut count = 0;
    let mut replace = |v: &mut Value, _: &str| {
        *v = Value::String(REDACTED.to_string());
        count += 1;
        Ok(())
    };
    // The closure never fails.
    let _ = walk(value, &mut String::new(), &mut replace);
    count
}

/// Replaces every sealed string in `value` by its plaintext, opened with `key`; returns
/// how many were opened. Stops at the first one that cannot be opened, naming where it is.
pub fn reveal(value: &mut Value, key: &SealingKey) -> Result<usize, RevealError> {
    let mut count = 0;
    let mut open = |v: &mut Value, path: &str| {
        let text = match v {
            Value::String(s) => std::mem::take(s),
            _ => return Ok(()),
        };
        let opened = Sealed::try_from(text).and_then(|sealed| key.open(&sealed));
        match opened {
            Ok(secret) => {
                *v = Value::String(secret.expose().to_string());
                count += 1;
                Ok(())
            }
            Err(error) => {
                *v = Value::String(REDACTED.to_string());
                Err(RevealError {
                    path: path.to_string(),
                    error,
                })
            }
        }
    };
    walk(value, &mut String::new(), &mut open)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(key: &SealingKey) -> Value {
        let seal = |s: &str| {
            Sealed::seal(&key.public_key(), s)
                .unwrap()
                .as_str()
                .to_string()
        };
        json!({
            "user": "app",
            "password": seal("pw1"),
            "nested": {"list": [1, seal("pw2"), "sealed:v2:not ours", {"a/b": seal("pw3")}]},
            "note": "mentions sealed:v1: inside",
        })
    }

    #[test]
    fn redact_hides_every_sealed_string() {
        let key = SealingKey::generate();
        let mut v = sample(&key);
        assert_eq!(redact(&mut v), 3);
        assert_eq!(
            v,
            json!({
                "user": "app",
                "password": "<sealed>",
                "nested": {"list": [1, "<sealed>", "sealed:v2:not ours", {"a/b": "<sealed>"}]},
                "note": "mentions sealed:v1: inside",
            })
        );
        // malformed sealed values are hidden too
        let mut v = json!(["sealed:v1:!!!"]);
        assert_eq!(redact(&mut v), 1);
        assert_eq!(v, json!(["<sealed>"]));
    }

    #[test]
    fn reveal_opens_every_sealed_string() {
        let key = SealingKey::generate();
        let mut v = sample(&key);
        assert_eq!(reveal(&mut v, &key).unwrap(), 3);
        assert_eq!(v["password"], "pw1");
        assert_eq!(v["nested"]["list"][1], "pw2");
        assert_eq!(v["nested"]["list"][3]["a/b"], "pw3");
        assert_eq!(v["user"], "app");
    }

    #[test]
    fn reveal_names_the_value_it_cannot_open() {
        let key = SealingKey::generate();
        let other = SealingKey::generate();
        let mut v =
            json!({"x": {"list": [Sealed::seal(&other.public_key(), "s").unwrap().as_str()]}});
        let err = reveal(&mut v, &key).unwrap_err();
        assert_eq!(err.path, "/x/list/0");
        assert!(matches!(err.error, SealError::WrongRecipient(_)));
        assert_eq!(v["x"]["list"][0], REDACTED);
        let mut v = json!({"a/b": "sealed:v1:garbage"});
        let err = reveal(&mut v, &key).unwrap_err();
        assert_eq!(err.path, "/a~1b");
        assert_eq!(err.error, SealError::Malformed);
    }
}
