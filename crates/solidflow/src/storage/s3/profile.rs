//! Static credentials and region from the shared AWS config files (`AWS_PROFILE`).

use std::path::PathBuf;

use super::S3Credentials;

/// What a profile provides.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Profile {
    pub credentials: Option<S3Credentials>,
    pub region: Option<String>,
}

/// Loads profile `AWS_PROFILE` (or `default`) from `AWS_SHARED_CREDENTIALS_FILE`
/// (`~/.aws/credentials`) and `AWS_CONFIG_FILE` (`~/.aws/config`). Only static keys are
/// supported; SSO and role chaining need the AWS CLI to export env vars instead.
pub(super) fn load(env: &dyn Fn(&str) -> Option<String>) -> Option<Profile> {
    let name = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
        .and_then(|p| std::fs::read_to_string(p).ok());
    let config = file("AWS_CONFIG_FILE", "config").and_then(|p| std::fs::read_to_string(p).ok());
    let profile = parse(credentials.as_deref(), config.as_deref(), &name);
    (profile != Profile::default()).then_some(profile)
}

/// Reads profile `name`: keys from the credentials file (`[name]`) or the config file
/// (`[profile name]`, or `[default]`), the region from the config file.
pub(super) fn parse(credentials: Option<&str>, config: Option<&str>, name: &str) -> Profile {
    let config_section = if name == "default" {
        "default".to_owned()
    } else {
        format!("profile {name}")
    };
    let from_credentials = credentials
        .map(|text| section(text, name))
        .unwrap_or_default();
    let from_config = config
        .map(|text| section(text, &config_section))
        .unwrap_or_default();
    let get = |key: &str| {
        from_credentials
            .iter()
            .chain(from_config.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let credentials = match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Some(S3Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: get("aws_session_token"),
        }),
        _ => None,
    };
    let region = from_config
        .iter()
        .find(|(k, _)| k == "region")
        .map(|(_, v)| v.clone());
    Profile {
        credentials,
        region,
    }
}

/// The `key = value` pairs of `[name]` in an INI file.
fn section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::storage::s3::S3Credentials;
    use crate::storage::s3::profile;

    #[test]
    fn profile_files_are_parsed() {
        let credentials = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s3cr3t\n\n[work]\naws_access_key_id=AKIDWORK\naws_secret_access_key=w0rk\naws_session_token = tok\n";
        let config = "[default]\nregion = eu-west-1\n[profile work]\nregion = ap-south-1\n";
        let p = profile::parse(Some(credentials), Some(config), "default");
        assert_eq!(
            p.credentials,
            Some(S3Credentials::new("AKIDDEFAULT", "s3cr3t"))
        );
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        let p = profile::parse(Some(credentials), Some(config), "work");
        assert_eq!(p.credentials.unwrap().session_token.as_deref(), Some("tok"));
        assert_eq!(p.region.as_deref(), Some("ap-south-1"));
        assert_eq!(
            profile::parse(None, Some(config), "missing"),
            profile::Profile::default()
        );
    }
}
