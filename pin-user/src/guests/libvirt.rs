//! libvirt's live status files (`/run/libvirt/qemu/<domain>.xml`): the
//! vCPU threads of guests whose QMP monitor libvirtd itself holds.
use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use super::Vcpu;

/// libvirt's status files are tens of KiB; anything far larger is not one.
const MAX_STATUS_BYTES: u64 = 4 << 20;
/// Elements nest about ten deep in a status file. A deeper document is
/// refused before parsing: 20 000 levels overflowed the parser's stack.
const MAX_DEPTH: usize = 256;

/// Where libvirt keeps the live status of running QEMU domains.
pub const DEFAULT_LIBVIRT_DIR: &str = "/run/libvirt/qemu";

/// The parts of libvirt's live status XML pinguard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtStatus {
    pub name: String,
    pub pid: u32,
    pub vcpus: Vec<Vcpu>,
    /// The guest agent's channel socket (`<channel type='unix'>` with
    /// `<target type='virtio' name='org.qemu.guest_agent.0'/>`), if any.
    pub agent: Option<std::path::PathBuf>,
}

/// Parses `/run/libvirt/qemu/<domain>.xml` (`<domstatus pid=..>` with
/// `<vcpus><vcpu id=.. pid=../></vcpus>`). `fallback_name` (the file
/// name) is used when the embedded `<domain>` has no `<name>`.
pub fn parse_libvirt_status(xml: &str, fallback_name: &str) -> Result<LibvirtStatus, String> {
    let depth = max_depth(xml);
    if depth > MAX_DEPTH {
        return Err(format!(
            "elements nest {depth} deep (more than {MAX_DEPTH}): not a libvirt status file"
        ));
    }
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domstatus" {
        return Err(format!(
            "expected a <domstatus> element, found <{}>",
            root.tag_name().name()
        ));
    }
    let pid = root
        .attribute("pid")
        .and_then(|p| p.parse().ok())
        .ok_or("<domstatus> has no numeric pid attribute")?;
    // Only the status's own <vcpus>: the embedded <domain> may have a
    // <vcpus> of its own (hotplug configuration) without thread ids.
    let mut vcpus = Vec::new();
    if let Some(list) = root.children().find(|n| n.has_tag_name("vcpus")) {
        for (pos, v) in list
            .children()
            .filter(|n| n.has_tag_name("vcpu"))
            .enumerate()
        {
            let tid = v
                .attribute("pid")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("<vcpu> number {pos} has no numeric pid attribute"))?;
            // Old libvirt wrote no id: the position is the index.
            let index = match v.attribute("id") {
                Some(id) => id
                    .parse()
                    .map_err(|_| format!("<vcpu id={id:?}> is not a number"))?,
                None => pos as u32,
            };
            vcpus.push(Vcpu { index, tid });
        }
    }
    vcpus.sort();
    let name = root
        .children()
        .find(|n| n.has_tag_name("domain"))
        .and_then(|d| d.children().find(|n| n.has_tag_name("name")))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| fallback_name.to_string());
    let agent = root
        .children()
        .find(|n| n.has_tag_name("domain"))
        .and_then(|d| d.children().find(|n| n.has_tag_name("devices")))
        .and_then(|devices| {
            devices
                .children()
                .filter(|c| c.has_tag_name("channel") && c.attribute("type") == Some("unix"))
                .find(|c| {
                    c.children().any(|t| {
                        t.has_tag_name("target")
                            && t.attribute("type") == Some("virtio")
                            && t.attribute("name") == Some(super::qemu::AGENT_PORT)
                    })
                })
        })
        .and_then(|c| c.children().find(|n| n.has_tag_name("source")))
        .and_then(|s| s.attribute("path"))
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    Ok(LibvirtStatus {
        name,
        pid,
        vcpus,
        agent,
    })
}

/// How deep elements nest, from the markup alone (comments, CDATA,
/// processing instructions and quoted attribute values skipped), without
/// building a tree. An upper bound is enough: it only decides refusal.
fn max_depth(xml: &str) -> usize {
    let b = xml.as_bytes();
    let (mut i, mut depth, mut max) = (0, 0usize, 0usize);
    let skip_to = |from: usize, end: &[u8]| {
        b[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(b.len(), |p| from + p + end.len())
    };
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_to(i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_to(i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_to(i + 2, b"?>");
        } else if rest.starts_with(b"<!") {
            i = skip_to(i + 2, b">");
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = skip_to(i + 2, b">");
        } else {
            // An opening tag: find its end outside quoted values.
            let mut j = i + 1;
            let mut quote = None;
            while j < b.len() {
                match (quote, b[j]) {
                    (None, q @ (b'"' | b'\'')) => quote = Some(q),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => break,
                    _ => {}
                }
                j += 1;
            }
            if j >= b.len() || b[j - 1] != b'/' {
                depth += 1;
                max = max.max(depth);
            }
            i = j + 1;
        }
    }
    max
}

/// Reads a status file: a regular file (a FIFO named `*.xml` would block the
/// reader forever; opened non-blocking, it is refused) of a bounded size.
fn read_status_file(path: &Path) -> io::Result<String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    file.take(MAX_STATUS_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_STATUS_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_STATUS_BYTES} bytes: not a libvirt status file"),
        ));
    }
    Ok(text)
}

/// The status files in `dir` by QEMU pid (`only`: just that pid's). A
/// missing directory means no libvirt; what cannot be read or parsed is a warning.
pub(super) fn read_status_dir(
    dir: &Path,
    only: Option<u32>,
    warnings: &mut Vec<String>,
) -> HashMap<u32, LibvirtStatus> {
    let mut out = HashMap::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        // No libvirt on this host: nothing to say.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
        Err(e) => {
            warnings.push(format!(
                "cannot read libvirt status directory {}: {e}",
                dir.display()
            ));
            return out;
        }
    };
    for entry in rd.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "xml") {
            continue;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match read_status_file(&path) {
            Ok(t) => t,
            // libvirt removes the file when the domain stops.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                warnings.push(format!("cannot read {}: {e}", path.display()));
                continue;
            }
        };
        match parse_libvirt_status(&text, &stem) {
            Ok(st) if only.is_none_or(|p| p == st.pid) => {
                out.insert(st.pid, st);
            }
            Ok(_) => {}
            Err(e) => warnings.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_status_xml() {
        let xml = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST.
-->
<domstatus state='running' reason='booted' pid='17150'>
  <monitor path='/var/lib/libvirt/qemu/domain-59-web/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='1' pid='17157'/>
    <vcpu id='0' pid='17156'/>
  </vcpus>
  <qemuCaps><flag name='kvm'/></qemuCaps>
  <domain type='kvm' id='59'>
    <name>web</name>
    <vcpu placement='static'>2</vcpu>
    <vcpus>
      <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>
      <vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/>
    </vcpus>
    <devices>
      <channel type='unix'>
        <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-59-web/org.qemu.guest_agent.0'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      </channel>
      <channel type='spicevmc'>
        <target type='virtio' name='com.redhat.spice.0'/>
      </channel>
    </devices>
  </domain>
</domstatus>"#;
        let st = parse_libvirt_status(xml, "file-stem").unwrap();
        assert_eq!(st.name, "web");
        assert_eq!(st.pid, 17150);
        assert_eq!(
            st.vcpus,
            vec![
                Vcpu {
                    index: 0,
                    tid: 17156
                },
                Vcpu {
                    index: 1,
                    tid: 17157
                }
            ]
        );

        // Old libvirt: no ids, no embedded domain.
        let old = "<domstatus state='running' pid='12262'><vcpus><vcpu pid='12266'/>\
                   <vcpu pid='12267'/></vcpus></domstatus>";
        assert_eq!(
            st.agent.as_deref(),
            Some(Path::new(
                "/var/lib/libvirt/qemu/channel/target/domain-59-web/org.qemu.guest_agent.0"
            ))
        );
        let st = parse_libvirt_status(old, "testvm").unwrap();
        assert_eq!(st.name, "testvm");
        assert_eq!(st.agent, None);
        assert_eq!(
            st.vcpus[1],
            Vcpu {
                index: 1,
                tid: 12267
            }
        );

        assert!(
            parse_libvirt_status("<domain/>", "x")
                .unwrap_err()
                .contains("domstatus")
        );
        assert!(
            parse_libvirt_status("<domstatus/>", "x")
                .unwrap_err()
                .contains("pid")
        );
        assert!(
            parse_libvirt_status(
                "<domstatus pid='1'><vcpus><vcpu id='0'/></vcpus></domstatus>",
                "x"
            )
            .unwrap_err()
            .contains("pid")
        );
        assert!(
            parse_libvirt_status("not xml", "x")
                .unwrap_err()
                .contains("invalid XML")
        );
    }

    #[test]
    fn hostile_files_in_the_status_directory_are_warnings_not_hangs_or_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let deep = "<a>".repeat(20_000) + &"</a>".repeat(20_000);
        fs::write(dir.path().join("deep.xml"), deep).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo.xml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = "<domstatus pid='1'>".to_string() + &" ".repeat(5 << 20) + "</domstatus>";
        fs::write(dir.path().join("big.xml"), big).unwrap();
        fs::write(
            dir.path().join("ok.xml"),
            "<domstatus pid='7'><!-- <a><b> --><vcpus><vcpu id='0' pid='8'/></vcpus>\
             <domain><name a='>'>ok</name></domain></domstatus>",
        )
        .unwrap();
        let mut warnings = Vec::new();
        let found = read_status_dir(dir.path(), None, &mut warnings);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[&7].name, "ok");
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        for (file, why) in [
            ("big.xml", "larger than"),
            ("deep.xml", "nest 20000 deep"),
            ("fifo.xml", "not a regular file"),
        ] {
            assert!(
                warnings.iter().any(|w| w.contains(file) && w.contains(why)),
                "{file}: {warnings:?}"
            );
        }
    }

    #[test]
    fn depth_counts_elements_not_markup() {
        assert_eq!(max_depth("<a><b/><c x='<d>'><![CDATA[<e>]]></c></a>"), 2);
        assert_eq!(
            max_depth("<?xml version='1.0'?><!DOCTYPE x><a><!-- <b><c> --></a>"),
            1
        );
    }
}
