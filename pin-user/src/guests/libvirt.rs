//! libvirt's live status files (`/run/libvirt/qemu/<domain>.xml`): the
//! vCPU threads of guests whose QMP monitor libvirtd itself holds.
use std::{collections::HashMap, fs, io, path::Path};

use super::Vcpu;

/// Where libvirt keeps the live status of running QEMU domains.
pub const DEFAULT_LIBVIRT_DIR: &str = "/run/libvirt/qemu";

/// The parts of libvirt's live status XML pinguard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtStatus {
    pub name: String,
    pub pid: u32,
    pub vcpus: Vec<Vcpu>,
}

/// Parses `/run/libvirt/qemu/<domain>.xml` (`<domstatus pid=..>` with
/// `<vcpus><vcpu id=.. pid=../></vcpus>`). `fallback_name` (the file
/// name) is used when the embedded `<domain>` has no `<name>`.
pub fn parse_libvirt_status(xml: &str, fallback_name: &str) -> Result<LibvirtStatus, String> {
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
    Ok(LibvirtStatus { name, pid, vcpus })
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
        let text = match fs::read_to_string(&path) {
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
        let st = parse_libvirt_status(old, "testvm").unwrap();
        assert_eq!(st.name, "testvm");
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
}
