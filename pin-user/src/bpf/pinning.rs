//! Crash-safe restarts: the daemon's programs, links and maps pinned in bpffs.
//!
//! `pinguard run` pins what it loads under `/sys/fs/bpf/pinguard/<layout>/`
//! (`maps/`, `progs/`, `links/`, one file per object, named as in pin-common).
//! A pinned link keeps its program attached after the process that made it is
//! gone, so a daemon killed with SIGKILL leaves the observer running and
//! counting. The next daemon adopts the pinned objects instead of loading
//! again: no second attachment, and the kernel's counters go on from where they
//! were. aya 0.14 cannot swap the program behind a link, so a pinned set the
//! binary cannot use as it is (another eBPF object, other load-time settings,
//! another set of programs) is detached and removed, and a fresh load follows.
//!
//! The layout name is a hash of the eBPF object and of the settings baked in at
//! load time (`layout`): any change to the maps, the event ABI or the program
//! code changes the object, so no hand-bumped version can be forgotten.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, MapInfo},
    pin::PinError,
    programs::{
        ProgramInfo,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use thiserror::Error;

/// Where bpffs is mounted on every systemd host.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Everything pinguard pins is below this directory (mode 0700).
pub const ROOT: &str = "/sys/fs/bpf/pinguard";
/// `statfs` magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const MAPS: &str = "maps";
const PROGS: &str = "progs";
const LINKS: &str = "links";

#[derive(Debug, Error)]
pub enum PinningError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "bpffs is not mounted at {BPFFS} and mounting it failed ({0}); mount it with \
         `mount -t bpf bpf {BPFFS}`"
    )]
    Mount(io::Error),
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("pinned map {path}: {source}")]
    Map { path: PathBuf, source: MapError },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinningError + '_ {
    move |source| PinningError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mounts bpffs at [`BPFFS`] unless it is there. True when it mounted it.
pub fn ensure_bpffs() -> Result<bool, PinningError> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(false);
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype, opts) = (c("bpf"), c(BPFFS), c("bpf"), c("mode=0700"));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PinningError::Mount(io::Error::last_os_error()));
    }
    Ok(true)
}

// `__fsword_t` is i64 on x86_64 but not on every architecture.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// The layout name for an eBPF object loaded with these load-time settings.
/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), and the
/// input is trusted (our own binary).
pub fn layout(object: &[u8], event_interval_ns: u64, events_bytes: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (interval, events) = (event_interval_ns.to_le_bytes(), events_bytes.to_le_bytes());
    for b in object.iter().chain(&interval).chain(&events) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("v{h:016x}")
}

/// What one entry under [`ROOT`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Found {
    pub name: String,
    /// False for a stray file (not a layout directory).
    pub is_dir: bool,
    pub programs: BTreeSet<String>,
    pub links: BTreeSet<String>,
    pub maps: BTreeSet<String>,
}

/// What to do with what is pinned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The layout directory to adopt.
    pub adopt: Option<String>,
    /// Entries to detach and remove, each with the reason.
    pub replace: Vec<(String, String)>,
}

/// Decides, from what is pinned, what a daemon that would attach `programs`
/// from layout `layout` does: adopt the directory of its own layout when it
/// holds exactly those programs, each with its link, and the maps `maps`;
/// replace everything else. Nothing adopted means a fresh load.
pub fn plan(found: &[Found], layout: &str, programs: &BTreeSet<String>, maps: &[&str]) -> Plan {
    let mut out = Plan::default();
    for f in found {
        let why = if !f.is_dir {
            Some("not a layout directory".to_owned())
        } else if f.name != layout {
            Some(format!(
                "layout {} is not this binary's ({layout}: another eBPF object or other \
                 load-time settings)",
                f.name
            ))
        } else if &f.programs != programs || &f.links != programs {
            Some(format!(
                "pinned programs {:?} with links {:?}, this daemon attaches {:?}",
                f.programs, f.links, programs
            ))
        } else {
            maps.iter()
                .find(|m| !f.maps.contains(**m))
                .map(|m| format!("map {m} is not pinned"))
        };
        match why {
            Some(why) => out.replace.push((f.name.clone(), why)),
            None => out.adopt = Some(f.name.clone()),
        }
    }
    out
}

fn names(dir: &Path) -> Result<BTreeSet<String>, PinningError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(io_err(dir))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Reads what is pinned under `root` (nothing when it does not exist).
pub fn scan(root: &Path) -> Result<Vec<Found>, PinningError> {
    let mut out = Vec::new();
    for name in names(root)? {
        let path = root.join(&name);
        let is_dir = is_real_dir(&path);
        let sub = |s| {
            if is_dir {
                names(&path.join(s))
            } else {
                Ok(BTreeSet::new())
            }
        };
        out.push(Found {
            programs: sub(PROGS)?,
            links: sub(LINKS)?,
            maps: sub(MAPS)?,
            name,
            is_dir,
        });
    }
    Ok(out)
}

/// Kind of a removed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Link,
    Program,
    Map,
    Other,
}

/// One pinned object removed, with its kernel id where it had one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    pub path: PathBuf,
    pub kind: Kind,
    pub name: String,
    /// Kernel id: of the program for links and programs, of the map for maps.
    pub id: Option<u32>,
}

/// Detaches and removes everything under `dir` (a layout directory or a
/// stray file), links first so that nothing runs against half-removed maps.
/// A link whose last reference was its pin detaches as its file goes; a
/// program or map is freed when nothing references it any more.
pub fn remove(dir: &Path) -> Result<Vec<Removed>, PinningError> {
    let mut out = Vec::new();
    // A symlink is removed, never followed: it could lead to another tool's pins.
    if !is_real_dir(dir) {
        std::fs::remove_file(dir).map_err(io_err(dir))?;
        out.push(Removed {
            path: dir.to_owned(),
            kind: Kind::Other,
            name: String::new(),
            id: None,
        });
        return Ok(out);
    }
    for (sub, kind) in [
        (LINKS, Kind::Link),
        (PROGS, Kind::Program),
        (MAPS, Kind::Map),
    ] {
        let subdir = dir.join(sub);
        if !is_real_dir(&subdir) {
            // Absent, or something else under our name (a symlink): below.
            continue;
        }
        for name in names(&subdir)? {
            let path = subdir.join(&name);
            if is_real_dir(&path) {
                // Not ours: bpffs pins are files. Removed all the same.
                out.extend(remove(&path)?);
                continue;
            }
            let id = match kind {
                Kind::Link => PinnedLink::from_pin(&path)
                    .ok()
                    .and_then(|l| FdLink::from(l).info().ok())
                    .map(|i| i.program_id()),
                Kind::Program => ProgramInfo::from_pin(&path).ok().map(|i| i.id()),
                Kind::Map => MapInfo::from_pin(&path).ok().map(|i| i.id()),
                Kind::Other => None,
            };
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            out.push(Removed {
                path,
                kind,
                name,
                id,
            });
        }
        std::fs::remove_dir(&subdir).map_err(io_err(&subdir))?;
    }
    // Anything else someone put there.
    for name in names(dir)? {
        let path = dir.join(&name);
        out.extend(remove(&path)?);
    }
    std::fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(out)
}

/// A directory itself, not a symlink to one.
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Removes everything pinguard pinned: what `pinguard cleanup` does.
pub fn remove_all(root: &Path) -> Result<Vec<Removed>, PinningError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for name in names(root)? {
        out.extend(remove(&root.join(name))?);
    }
    std::fs::remove_dir(root).map_err(io_err(root))?;
    Ok(out)
}

fn mkdir(path: &Path) -> Result<(), PinningError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err(path))
}

/// The pinned objects a daemon holds, and where.
#[derive(Debug)]
pub struct Pins {
    pub dir: PathBuf,
    /// Held so that the links detach when the daemon exits after unpinning.
    _links: Vec<PinnedLink>,
}

impl Pins {
    /// Removes the pins: the programs detach when the daemon drops its
    /// handles (at exit).
    pub fn unpin(&self) -> Result<Vec<Removed>, PinningError> {
        let out = remove(&self.dir)?;
        // The root goes too when this was its only layout.
        let root = self.dir.parent().unwrap_or(Path::new(ROOT));
        if names(root)?.is_empty() {
            std::fs::remove_dir(root).map_err(io_err(root))?;
        }
        Ok(out)
    }
}

/// Pins the maps and attached programs of a fresh load, and their links
/// (`links`, taken from the programs), under `dir`. Links last: a directory
/// with every link is complete (see [`plan`]).
pub fn pin_loaded(
    ebpf: &mut Ebpf,
    links: Vec<(&'static str, FdLink)>,
    dir: &Path,
) -> Result<Pins, PinningError> {
    for sub in [MAPS, PROGS, LINKS] {
        mkdir(&dir.join(sub))?;
    }
    for (name, map) in ebpf.maps() {
        // `.rodata`, `.bss`: referenced by the programs, never read by us.
        if name.starts_with('.') {
            continue;
        }
        let path = dir.join(MAPS).join(name);
        map.pin(&path)
            .map_err(|source| PinningError::Pin { path, source })?;
    }
    for (name, _) in &links {
        let path = dir.join(PROGS).join(name);
        if let Some(p) = ebpf.program_mut(name) {
            p.pin(&path)
                .map_err(|source| PinningError::Pin { path, source })?;
        }
    }
    let mut pinned = Vec::new();
    for (name, link) in links {
        let path = dir.join(LINKS).join(name);
        pinned.push(
            link.pin(&path)
                .map_err(|source| PinningError::Pin { path, source })?,
        );
    }
    Ok(Pins {
        dir: dir.to_owned(),
        _links: pinned,
    })
}

/// The objects of an adopted layout directory.
#[derive(Debug)]
pub struct Adopted {
    pub maps: HashMap<String, Map>,
    pub programs: BTreeMap<String, PathBuf>,
    pub pins: Pins,
}

/// Opens every pinned map, program and link of `dir`.
pub fn adopt(dir: &Path) -> Result<Adopted, PinningError> {
    let mut maps = HashMap::new();
    for name in names(&dir.join(MAPS))? {
        let path = dir.join(MAPS).join(&name);
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(|source| PinningError::Map { path, source })?;
        maps.insert(name, map);
    }
    let programs = names(&dir.join(PROGS))?
        .into_iter()
        .map(|n| {
            let p = dir.join(PROGS).join(&n);
            (n, p)
        })
        .collect();
    let mut links = Vec::new();
    for name in names(&dir.join(LINKS))? {
        let path = dir.join(LINKS).join(&name);
        links.push(
            PinnedLink::from_pin(&path).map_err(|source| PinningError::Link { path, source })?,
        );
    }
    Ok(Adopted {
        maps,
        programs,
        pins: Pins {
            dir: dir.to_owned(),
            _links: links,
        },
    })
}

/// Where a [`super::probe::Probe`]'s maps and programs live: in an object it
/// loaded, or in bpffs (adopted).
pub enum Objects {
    Loaded(Ebpf),
    Adopted {
        maps: HashMap<String, Map>,
        programs: BTreeMap<String, PathBuf>,
    },
}

impl Objects {
    pub fn map(&self, name: &str) -> Option<&Map> {
        match self {
            Self::Loaded(e) => e.map(name),
            Self::Adopted { maps, .. } => maps.get(name),
        }
    }

    pub fn map_mut(&mut self, name: &str) -> Option<&mut Map> {
        match self {
            Self::Loaded(e) => e.map_mut(name),
            Self::Adopted { maps, .. } => maps.get_mut(name),
        }
    }

    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        match self {
            Self::Loaded(e) => e.take_map(name),
            Self::Adopted { maps, .. } => maps.remove(name),
        }
    }

    /// The kernel's information on a program (run time, count, id).
    pub fn program_info(&self, name: &str) -> Option<ProgramInfo> {
        match self {
            Self::Loaded(e) => e.program(name)?.info().ok(),
            Self::Adopted { programs, .. } => ProgramInfo::from_pin(programs.get(name)?).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn dir(name: &str, programs: &[&str], maps: &[&str]) -> Found {
        Found {
            name: name.into(),
            is_dir: true,
            programs: set(programs),
            links: set(programs),
            maps: set(maps),
        }
    }

    const MAPS_NEEDED: &[&str] = &["GUARDED", "EVENTS"];

    #[test]
    fn nothing_pinned_is_a_fresh_load() {
        let p = plan(&[], "v1", &set(&["a"]), MAPS_NEEDED);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn own_complete_layout_is_adopted() {
        let found = [dir("v1", &["a", "b"], &["GUARDED", "EVENTS", "X"])];
        let p = plan(&found, "v1", &set(&["a", "b"]), MAPS_NEEDED);
        assert_eq!(p.adopt.as_deref(), Some("v1"));
        assert!(p.replace.is_empty(), "{p:?}");
    }

    #[test]
    fn other_layouts_and_stray_files_are_replaced() {
        let stray = Found {
            name: "junk".into(),
            ..Found::default()
        };
        let found = [dir("v0", &["a"], MAPS_NEEDED), stray];
        let p = plan(&found, "v1", &set(&["a"]), MAPS_NEEDED);
        assert_eq!(p.adopt, None);
        let names: Vec<_> = p.replace.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["v0", "junk"]);
        assert!(p.replace[0].1.contains("layout v0"), "{p:?}");
    }

    #[test]
    fn another_program_set_or_a_missing_link_or_map_is_replaced() {
        // The attach list changed (a program became opt-in, another hook).
        let p = plan(
            &[dir("v1", &["a", "b"], MAPS_NEEDED)],
            "v1",
            &set(&["a"]),
            MAPS_NEEDED,
        );
        assert_eq!((p.adopt, p.replace.len()), (None, 1));
        // A daemon killed while pinning: a link missing.
        let mut half = dir("v1", &["a", "b"], MAPS_NEEDED);
        half.links.remove("b");
        let p = plan(&[half], "v1", &set(&["a", "b"]), MAPS_NEEDED);
        assert_eq!(p.adopt, None);
        assert!(p.replace[0].1.contains("links"), "{p:?}");
        let p = plan(
            &[dir("v1", &["a"], &["GUARDED"])],
            "v1",
            &set(&["a"]),
            MAPS_NEEDED,
        );
        assert_eq!(p.adopt, None);
        assert!(p.replace[0].1.contains("map EVENTS"), "{p:?}");
    }

    #[test]
    fn scan_reads_a_tree_and_remove_all_empties_it_links_first() {
        // A plain directory stands in for bpffs: the walk is the same.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("pinguard");
        for (sub, name) in [("maps", "EVENTS"), ("progs", "a"), ("links", "a")] {
            std::fs::create_dir_all(root.join("v1").join(sub)).unwrap();
            std::fs::write(root.join("v1").join(sub).join(name), "").unwrap();
        }
        std::fs::write(root.join("stray"), "").unwrap();
        let found = scan(&root).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[1], dir("v1", &["a"], &["EVENTS"]));
        assert!(!found[0].is_dir);
        let removed = remove_all(&root).unwrap();
        let kinds: Vec<_> = removed.iter().map(|r| (r.kind, r.name.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (Kind::Other, ""),
                (Kind::Link, "a"),
                (Kind::Program, "a"),
                (Kind::Map, "EVENTS")
            ]
        );
        assert!(!root.exists());
        assert!(
            remove_all(&root).unwrap().is_empty(),
            "nothing left is fine"
        );
    }

    #[test]
    fn layout_changes_with_the_object_and_load_time_settings() {
        let a = layout(b"object", 1_000_000_000, 4096);
        assert_eq!(a, layout(b"object", 1_000_000_000, 4096));
        assert!(a.starts_with('v') && a.len() == 17, "{a}");
        assert_ne!(a, layout(b"objecT", 1_000_000_000, 4096));
        assert_ne!(a, layout(b"object", 1_000_000, 4096));
        assert_ne!(a, layout(b"object", 1_000_000_000, 8192));
    }

    #[test]
    fn removal_unlinks_symlinks_and_never_follows_them() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tmp.path().join("another-tool");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("its-pin"), "").unwrap();
        let root = tmp.path().join("pinguard");
        let layout = root.join("v1");
        std::fs::create_dir_all(layout.join(MAPS)).unwrap();
        std::os::unix::fs::symlink(&other, layout.join(LINKS)).unwrap();
        std::os::unix::fs::symlink(&other, layout.join(MAPS).join("x")).unwrap();
        std::os::unix::fs::symlink(&other, root.join("v0")).unwrap();
        remove_all(&root).unwrap();
        assert!(!root.exists());
        assert!(other.join("its-pin").exists(), "followed a symlink out of our directory");
    }

}
