//! An opt-in cache of the compilers' outputs, `PEFT_KERNELS_BUILD_CACHE=<folder>`, for a
//! machine that builds the crate under several feature sets and profiles from one checkout:
//! cargo runs this build script once per combination (CI: six of them), and every run would
//! otherwise compile each kernel again with g++ and nvcc. An entry is one compiler run's
//! output files, keyed by a hash of everything they are made from: every file under
//! kernels/ and build/ and build.rs (so any edit misses), the compiler's version, the run's
//! own settings and the file it compiles. A hit copies the entry's files into OUT_DIR. The
//! folder may be deleted at any time; without the variable nothing is cached.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

pub struct Cache {
    dir: Option<PathBuf>,
    /// The hash of the repository's build inputs, the prefix of every key.
    tree: String,
}

impl Cache {
    pub fn from_env(root: &Path) -> Cache {
        println!("cargo::rerun-if-env-changed=PEFT_KERNELS_BUILD_CACHE");
        let dir = std::env::var_os("PEFT_KERNELS_BUILD_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let tree = match &dir {
            Some(_) => {
                let mut files = Vec::new();
                for sub in ["kernels", "build"] {
                    walk(&root.join(sub), &mut files);
                }
                files.push(root.join("build.rs"));
                files.sort();
                let parts: Vec<String> = files
                    .iter()
                    .map(|f| {
                        let bytes = std::fs::read(f).unwrap_or_default();
                        format!(
                            "{}:{}",
                            f.strip_prefix(root).unwrap().display(),
                            hash(&[&bytes])
                        )
                    })
                    .collect();
                hash(&parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>())
            }
            None => String::new(),
        };
        Cache { dir, tree }
    }

    /// The entry of a compiler run described by `parts` (compiler version, settings, file).
    pub fn entry(&self, parts: &[&str]) -> Option<Entry> {
        let dir = self.dir.as_ref()?;
        let mut all: Vec<&[u8]> = vec![self.tree.as_bytes()];
        all.extend(parts.iter().map(|p| p.as_bytes()));
        Some(Entry(dir.join(hash(&all))))
    }
}

/// One cached compiler run: a folder holding its output files by name.
pub struct Entry(PathBuf);

impl Entry {
    /// Copies the entry's files to `outputs` (each by its file name); false, and nothing
    /// reliable written, unless the entry holds all of them.
    pub fn fetch(&self, outputs: &[&Path]) -> bool {
        outputs.iter().all(|out| {
            let cached = self.0.join(out.file_name().unwrap());
            std::fs::copy(cached, out).is_ok()
        })
    }

    /// Stores `outputs` (best effort: a cache that cannot be written only costs time). The
    /// entry appears whole or not at all: written to a private folder, then renamed.
    pub fn store(&self, outputs: &[&Path]) {
        let Some(parent) = self.0.parent() else {
            return;
        };
        let tmp = parent.join(format!(
            ".tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let copied = std::fs::create_dir_all(&tmp).is_ok()
            && outputs
                .iter()
                .all(|out| std::fs::copy(out, tmp.join(out.file_name().unwrap())).is_ok());
        if !copied || std::fs::rename(&tmp, &self.0).is_err() {
            // Another build stored the same entry first, or the folder is not writable.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
}

/// 128 bits of hash as hex: two SipHash runs (std's, stable for one toolchain, which is all
/// a cache inside one target folder needs) with different prefixes.
fn hash(parts: &[&[u8]]) -> String {
    let half = |seed: u8| {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        for p in parts {
            p.hash(&mut h);
        }
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, files);
        } else {
            files.push(p);
        }
    }
}
