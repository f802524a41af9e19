//! Operation arguments from the command line: `key=value` pairs, and `name=value`
//! secrets that are sealed to the agent before they leave this process.

use dbvm_protocol::seal::{SealError, Sealed, Secret};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("argument {0:?} is not key=value")]
    NotAPair(String),
    #[error("argument {0:?} has an empty key: write key=value")]
    EmptyKey(String),
    #[error("argument {0:?} is given twice")]
    Duplicate(String),
    /// The text is not repeated: it may be the secret itself.
    #[error("secret number {0} is not name=value (its text is not shown)")]
    SecretNotAPair(usize),
    #[error("secret {0:?} is also given as a plain key=value argument: give it once")]
    SecretDuplicate(String),
    #[error("cannot read secret {name:?} from {path}: {error}")]
    SecretFile {
        name: String,
        path: String,
        error: String,
    },
    #[error("cannot seal secret {name:?} to the agent's key: {error}")]
    Seal { name: String, error: SealError },
}

/// Parses `key=value` pairs into a JSON object. A value that is valid JSON (a number,
/// `true`, `null`, `"quoted"`, an object or array) is used as such; anything else is a
/// string. So `port=5432` is a number and `port='"5432"'` a string.
pub fn parse_args(pairs: &[String]) -> Result<Map<String, Value>, ArgsError> {
    let mut args = Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ArgsError::NotAPair(pair.clone()))?;
        if key.is_empty() {
            return Err(ArgsError::EmptyKey(pair.clone()));
        }
        let value = serde_json::from_str::<Value>(value)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        if args.insert(key.to_string(), value).is_some() {
            return Err(ArgsError::Duplicate(key.to_string()));
        }
    }
    Ok(args)
}

/// Splits `name=value` secrets; values are kept verbatim (never parsed as JSON).
/// Errors never repeat the text, which may be a mistyped secret.
pub fn parse_secrets(pairs: &[String]) -> Result<Vec<(String, Secret)>, ArgsError> {
    let mut out: Vec<(String, Secret)> = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        let (name, value) = match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() => (name, value),
            _ => return Err(ArgsError::SecretNotAPair(i + 1)),
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(ArgsError::Duplicate(name.to_string()));
        }
        out.push((name.to_string(), Secret::new(value)));
    }
    Ok(out)
}

/// Reads `name=path` secrets: the file's text, one trailing newline dropped. Errors name
/// the file, never its content.
pub fn read_secret_files(pairs: &[String]) -> Result<Vec<(String, Secret)>, ArgsError> {
    let mut out: Vec<(String, Secret)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (name, path) = match pair.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => (name, path),
            _ => return Err(ArgsError::NotAPair(pair.clone())),
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(ArgsError::Duplicate(name.to_string()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| ArgsError::SecretFile {
            name: name.to_string(),
            path: path.to_string(),
            error: e.to_string(),
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        out.push((name.to_string(), Secret::new(text)));
    }
    Ok(out)
}

/// Seals each secret to `recipient` (the agent's X25519 key) and adds it to `args`; a
/// dotted name (`cloud.access_key_id`) goes into the nested object it names.
pub fn seal_secrets(
    args: &mut Map<String, Value>,
    secrets: &[(String, Secret)],
    recipient: &[u8; 32],
) -> Result<(), ArgsError> {
    for (name, secret) in secrets {
        // `cloud.access_key_id` goes into the object `cloud` (made when absent).
        let (path, leaf) = match name.rsplit_once('.') {
            Some((path, leaf)) => (Some(path), leaf),
            None => (None, name.as_str()),
        };
        let mut target = &mut *args;
        for part in path.into_iter().flat_map(|p| p.split('.')) {
            target = match target
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()))
            {
                Value::Object(m) => m,
                _ => return Err(ArgsError::SecretDuplicate(name.clone())),
            };
        }
        if target.contains_key(leaf) {
            return Err(ArgsError::SecretDuplicate(name.clone()));
        }
        let sealed = Sealed::seal(recipient, secret.expose()).map_err(|error| ArgsError::Seal {
            name: name.clone(),
            error,
        })?;
        target.insert(leaf.to_string(), Value::String(sealed.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::seal::SealingKey;
    use serde_json::json;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_are_json_when_they_parse_and_strings_otherwise() {
        let args = parse_args(&strings(&[
            "name=db1",
            "port=5432",
            "ratio=0.5",
            "on=true",
            "nothing=null",
            "quoted=\"5432\"",
            "obj={\"a\":[1,2]}",
            "empty=",
            "eq=a=b",
            "spaced= x ",
            "brace={not json",
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(args),
            json!({
                "name": "db1",
                "port": 5432,
                "ratio": 0.5,
                "on": true,
                "nothing": null,
                "quoted": "5432",
                "obj": {"a": [1, 2]},
                "empty": "",
                "eq": "a=b",
                "spaced": " x ",
                "brace": "{not json",
            })
        );
        assert!(parse_args(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_pairs_are_named() {
        let err = parse_args(&strings(&["a=1", "oops"])).unwrap_err();
        assert_eq!(err.to_string(), "argument \"oops\" is not key=value");
        let err = parse_args(&strings(&["=1"])).unwrap_err();
        assert!(
            matches!(err, ArgsError::EmptyKey(ref p) if p == "=1"),
            "{err}"
        );
        let err = parse_args(&strings(&["a=1", "a=2"])).unwrap_err();
        assert!(
            matches!(err, ArgsError::Duplicate(ref k) if k == "a"),
            "{err}"
        );
    }

    #[test]
    fn secret_files_are_read_without_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "s3cr3t\n").unwrap();
        let got = read_secret_files(&[format!("key={}", f.display())]).unwrap();
        assert_eq!(got[0].0, "key");
        assert_eq!(got[0].1.expose(), "s3cr3t");
        let e = read_secret_files(&["key=/nonexistent/x".to_string()]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
        assert!(read_secret_files(&["key".to_string()]).is_err());
    }

    #[test]
    fn secrets_are_sealed_and_never_echoed() {
        let err = parse_secrets(&strings(&["pw=ok", "hunter2"])).unwrap_err();
        assert!(matches!(err, ArgsError::SecretNotAPair(2)));
        assert!(!err.to_string().contains("hunter2"));
        assert!(parse_secrets(&strings(&["=hunter2"])).is_err());

        let key = SealingKey::generate();
        let secrets = parse_secrets(&strings(&["password=p=w {1}"])).unwrap();
        assert!(!format!("{secrets:?}").contains("p=w"));
        let mut args = parse_args(&strings(&["user=app"])).unwrap();
        seal_secrets(&mut args, &secrets, &key.public_key()).unwrap();
        let sealed = args["password"].as_str().unwrap();
        assert!(sealed.starts_with("sealed:v1:"));
        let sealed = Sealed::try_from(sealed.to_string()).unwrap();
        assert_eq!(key.open(&sealed).unwrap().expose(), "p=w {1}");

        let err = seal_secrets(&mut args, &secrets, &key.public_key()).unwrap_err();
        assert!(matches!(err, ArgsError::SecretDuplicate(ref n) if n == "password"));
    }
}
