//! Files that configuration keys name (secrets, certificates, keys), read once at start-up
//! and, for TLS, at a reload. One reader, so that every failure names the key and the path
//! the same way.

use std::path::Path;

use super::ConfigError;

/// Reads the file `key` names; a failure is [`ConfigError::File`] with that key and path.
pub(super) fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// [`read`] for text: a file that is not UTF-8 fails as `std::fs::read_to_string` does.
pub(super) fn read_utf8(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    String::from_utf8(read(key, path)?).map_err(|_| ConfigError::File {
        key,
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ),
    })
}

/// A file holding one value (a secret, a URL, a CA): its text without the final line
/// ending (only that: a password may begin or end with a space); empty is an error.
pub(super) fn read_value(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = read_utf8(key, path)?;
    let text = text.trim_end_matches(['\r', '\n']).to_string();
    if text.is_empty() {
        return Err(ConfigError::invalid(key, "the file is empty"));
    }
    Ok(text)
}

/// The file's permission bits when group or others may read it.
#[cfg(unix)]
pub(super) fn loose_permissions(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

#[cfg(not(unix))]
pub(super) fn loose_permissions(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_names_the_key_and_the_path_and_text_must_be_utf8() {
        let dir = std::env::temp_dir().join(format!("gsp-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let absent = dir.join("absent");
        let err = read("auth.client_secret_file", &absent).unwrap_err();
        assert!(
            matches!(&err, ConfigError::File { key: "auth.client_secret_file", path, .. } if *path == absent),
            "{err:?}"
        );
        // The same failure std::fs::read_to_string reports, so nothing changes for callers.
        let latin1 = dir.join("latin1");
        std::fs::write(&latin1, b"caf\xe9\n").unwrap();
        let std_err = std::fs::read_to_string(&latin1).unwrap_err();
        match read_utf8("cache.shared.ca_file", &latin1).unwrap_err() {
            ConfigError::File { key, source, .. } => {
                assert_eq!(key, "cache.shared.ca_file");
                assert_eq!(source.kind(), std_err.kind());
                assert_eq!(source.to_string(), std_err.to_string());
            }
            other => panic!("{other:?}"),
        }
        let value = dir.join("value");
        std::fs::write(&value, " spaced \r\n").unwrap();
        assert_eq!(read_value("k", &value).unwrap(), " spaced ");
        std::fs::write(&value, "\n").unwrap();
        assert!(read_value("k", &value)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
