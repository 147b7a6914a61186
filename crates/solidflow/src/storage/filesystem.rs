//! `filesystem` storage: intermediates as files under a base directory.
//!
//! Writes go to a temporary file in the destination directory, are flushed, and are then
//! renamed into place, so a reader sees either the whole value or nothing.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{IntermediateKey, IntermediateStorage, Reach, StorageError, WriteFn};
use crate::config::json_schema::{config_type_of, parse_block};
use crate::definition::storage::{StorageContext, StorageDefinition};

/// Intermediates stored as files: `<base_dir>/<run_id>/intermediates/<step_key>/<output>`.
#[derive(Debug, Clone)]
pub struct FilesystemStorage {
    base_dir: PathBuf,
    shared: bool,
}

impl FilesystemStorage {
    /// Storage rooted at `base_dir` (created on first write).
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            shared: false,
        }
    }

    /// Declares that `base_dir` is on a filesystem every worker mounts at the same path
    /// (NFS and the like), which makes this storage usable for distributed runs.
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// The root directory.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    fn path(&self, key: &IntermediateKey) -> PathBuf {
        self.base_dir.join(key.relative_path())
    }

    fn io(
        &self,
        operation: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> StorageError {
        let location = path.display().to_string();
        move |source| {
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ) {
                StorageError::Full { location, source }
            } else {
                StorageError::Io {
                    operation,
                    location,
                    source,
                }
            }
        }
    }
}

/// `storage: {filesystem: {config: ...}}`: one serde type, from which its schema,
/// defaults and parsing derive.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FilesystemConfig {
    /// Directory for intermediates; defaults to $SOLIDFLOW_HOME/storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub base_dir: Option<PathBuf>,
    /// Declare base_dir a shared mount (NFS) visible at the same path on every worker.
    pub shared: bool,
}

fn build(
    config: &Value,
    ctx: &StorageContext,
) -> Result<Arc<dyn IntermediateStorage>, StorageError> {
    let config: FilesystemConfig = parse_block(config, &["storage", "filesystem", "config"])
        .map_err(|e| StorageError::Unusable {
            kind: "filesystem",
            message: e.to_string(),
        })?;
    let base = config.base_dir.unwrap_or_else(|| ctx.home.join("storage"));
    Ok(Arc::new(FilesystemStorage::new(base).shared(config.shared)))
}

/// The `filesystem` storage definition.
pub(crate) fn definition() -> StorageDefinition {
    StorageDefinition {
        name: "filesystem",
        description: "Store intermediates as files on a local or shared filesystem.",
        config: config_type_of::<FilesystemConfig>,
        build,
    }
}

impl IntermediateStorage for FilesystemStorage {
    fn kind(&self) -> &'static str {
        "filesystem"
    }

    fn reach(&self) -> Reach {
        if self.shared {
            Reach::Cluster
        } else {
            Reach::Machine
        }
    }

    fn location(&self, key: &IntermediateKey) -> String {
        self.path(key).display().to_string()
    }

    fn preflight(&self) -> Result<(), StorageError> {
        fs::create_dir_all(&self.base_dir).map_err(|e| StorageError::Unusable {
            kind: "filesystem",
            message: format!("cannot create base_dir {}: {e}", self.base_dir.display()),
        })?;
        tempfile::NamedTempFile::new_in(&self.base_dir)
            .map(drop)
            .map_err(|e| StorageError::Unusable {
                kind: "filesystem",
                message: format!("base_dir {} is not writable: {e}", self.base_dir.display()),
            })
    }

    fn write(&self, key: &IntermediateKey, write: WriteFn<'_>) -> Result<u64, StorageError> {
        let path = self.path(key);
        let dir = path.parent().expect("key path has a parent");
        fs::create_dir_all(dir).map_err(self.io("create directory", dir))?;
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(self.io("create temporary file in", dir))?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
        write(&mut out).map_err(self.io("write", &path))?;
        out.flush().map_err(self.io("write", &path))?;
        drop(out);
        let len = tmp
            .as_file()
            .metadata()
            .map_err(self.io("write", &path))?
            .len();
        // Rename is atomic within a directory; the temp file is removed if anything above failed.
        tmp.persist(&path)
            .map_err(|e| self.io("rename into", &path)(e.error))?;
        Ok(len)
    }

    fn read(&self, key: &IntermediateKey) -> Result<Box<dyn Read + Send>, StorageError> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(f) => Ok(Box::new(BufReader::with_capacity(1 << 20, f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound {
                location: path.display().to_string(),
            }),
            Err(e) => Err(self.io("read", &path)(e)),
        }
    }

    fn exists(&self, key: &IntermediateKey) -> Result<bool, StorageError> {
        Ok(self.path(key).is_file())
    }

    fn list_run(&self, run_id: &str) -> Result<Vec<IntermediateKey>, StorageError> {
        let root = self.base_dir.join(run_id).join("intermediates");
        let mut keys = Vec::new();
        let steps = match fs::read_dir(&root) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(keys),
            Err(e) => return Err(self.io("list", &root)(e)),
        };
        for step in steps {
            let step = step.map_err(self.io("list", &root))?;
            let step_key = step.file_name().to_string_lossy().into_owned();
            for output in fs::read_dir(step.path()).map_err(self.io("list", &step.path()))? {
                let output = output.map_err(self.io("list", &step.path()))?;
                let name = output.file_name().to_string_lossy().into_owned();
                // Skip temp files of writers still in flight.
                if output.path().is_file() && !name.starts_with(".tmp") {
                    keys.push(IntermediateKey::new(run_id, step_key.clone(), name));
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}
