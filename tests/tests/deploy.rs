//! The deployment files in `deploy/`: the KRE image script builds the same bytes and PCRs twice
//! and refuses a development binary; every systemd unit passes `systemd-analyze verify` (where
//! it is installed) and says what docs/deploy.md promises; the Kubernetes manifests parse and
//! the static pod carries the KMS plugin beside kube-apiserver on a shared socket.
//!
//! It trusts `keygate eif describe` for PCR values (docs/eif.md pins those) and PyYAML, when
//! present, for parsing YAML. A check whose tool is missing prints a SKIPPED line; the checks
//! that need no tool always run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use keygate_tests::e2e::{dev_kre, exited, ok, path_arg, unix, Logged};
use keygate_tests::{bin, keygate, run_with_limit, TempDir};

/// The repository's `deploy/` directory.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn write_executable(p: &Path, text: &str) {
    std::fs::write(p, text).expect("write");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Whether `tool` is an executable on PATH.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

/// A private directory for a check that needs `tool`; without `tool` on PATH, a SKIPPED line
/// naming the check instead (never a silent pass).
fn dir_for_check_with(tool: &str, check: &str) -> Option<TempDir> {
    if !on_path(tool) {
        println!("SKIPPED {check}: {tool} is not on PATH");
        return None;
    }
    Some(TempDir::new("keygate-deploy").expect("tmp"))
}

/// Stand-ins for nitro-cli's blob directory: the script needs their bytes, not a real kernel.
fn fake_blobs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("blobs");
    let files: [(&str, &[u8]); 5] = [
        ("bzImage", b"test kernel image"),
        (
            "bzImage.config",
            b"#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 4.14.256 Kernel Configuration\n#\n",
        ),
        ("cmdline", b"reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0\n"),
        ("init", b"#!/bin/sh\n# test init\n"),
        ("nsm.ko", b"test nsm module"),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("blob");
    }
}

/// The genesis bundle (one approver) and three custodian public keys, made once in `d`.
fn genesis_and_custodians(d: &Path) -> (PathBuf, Vec<PathBuf>) {
    let (genesis, custodians, _) = genesis_custodians_and_digest(d);
    (genesis, custodians)
}

/// [`genesis_and_custodians`] and the genesis bundle's digest, as `keygate policy init` prints it.
fn genesis_custodians_and_digest(d: &Path) -> (PathBuf, Vec<PathBuf>, String) {
    for n in ["a1", "c1", "c2", "c3"] {
        ok(keygate(&["keygen", "-o", &path_arg(&d.join(format!("{n}.pem")))]));
    }
    let genesis = d.join("genesis.bundle");
    let said = ok(keygate(&[
        "policy",
        "init",
        "--approver",
        &path_arg(&d.join("a1.pub.pem")),
        "--threshold",
        "1",
        "-o",
        &path_arg(&genesis),
    ]));
    let digest = said.split_whitespace().last().unwrap_or_default().trim_end_matches(')').to_owned();
    (genesis, ["c1", "c2", "c3"].iter().map(|n| d.join(format!("{n}.pub.pem"))).collect(), digest)
}

/// A copy of the workspace's keygate-enclave in `d` (the production binary: hardware NSM only).
/// A test build, not the release build the script makes by default (too slow for the shared
/// test machine); stripped when `strip` is there, only to make the builds faster.
fn enclave_binary(d: &Path) -> PathBuf {
    let enclave = d.join("keygate-enclave");
    std::fs::copy(bin("keygate-enclave"), &enclave).expect("copy");
    if on_path("strip") {
        assert!(Command::new("strip").arg(&enclave).status().expect("strip").success());
    }
    enclave
}

/// Runs deploy/kre-image.sh with `args` (2 min limit: it gzips the whole KRE binary).
fn kre_image(args: &[String]) -> Output {
    run_with_limit(Command::new("bash").arg(deploy().join("kre-image.sh")).args(args), Duration::from_secs(120))
}

/// The script's arguments for one build into `out`; `enclave` is the KRE binary to put in.
fn image_args(blobs: &Path, genesis: &Path, custodians: &[PathBuf], enclave: &Path, out: &Path) -> Vec<String> {
    let mut args = vec!["--blobs".to_owned(), path_arg(blobs), "--genesis".into(), path_arg(genesis)];
    for c in custodians {
        args.extend(["--custodian".into(), path_arg(c)]);
    }
    args.extend(["--threshold".into(), "2".into(), "--enclave-bin".into(), path_arg(enclave)]);
    args.extend(["--keygate".into(), path_arg(&bin("keygate")), "-o".into(), path_arg(out)]);
    args
}

/// PCR0-2 of an EIF as `keygate eif describe --json` measures them.
fn described_pcrs(eif: &Path) -> [String; 3] {
    let j: serde_json::Value =
        serde_json::from_str(&ok(keygate(&["eif", "describe", &path_arg(eif), "--json"]))).expect("describe json");
    ["PCR0", "PCR1", "PCR2"].map(|k| j["Measurements"][k].as_str().expect("pcr").to_owned())
}

#[test]
fn the_kre_image_reproduces_byte_for_byte_and_prints_its_pcrs() {
    let dir = TempDir::new("keygate-deploy-image").expect("tmp");
    let d = dir.path();
    let (genesis, custodians) = genesis_and_custodians(d);
    let enclave = enclave_binary(d);
    // The second build's inputs are copies elsewhere, written later: only their bytes count.
    let (blobs1, blobs2) = (d.join("one/blobs"), d.join("two/blobs"));
    fake_blobs(&blobs1);
    fake_blobs(&blobs2);
    let (out1, out2) = (d.join("one/out"), d.join("two/out"));
    let printed1 = ok(kre_image(&image_args(&blobs1, &genesis, &custodians, &enclave, &out1)));
    let printed2 = ok(kre_image(&image_args(&blobs2, &genesis, &custodians, &enclave, &out2)));

    let eif1 = std::fs::read(out1.join("kre.eif")).expect("eif 1");
    assert!(eif1 == std::fs::read(out2.join("kre.eif")).expect("eif 2"), "the two builds differ");
    assert_eq!(read(&out1.join("kre.pcrs.json")), read(&out2.join("kre.pcrs.json")));
    let pcrs = described_pcrs(&out1.join("kre.eif"));
    assert_eq!(pcrs, described_pcrs(&out2.join("kre.eif")));
    // What the script prints and writes are the measured PCRs.
    let written: serde_json::Value = serde_json::from_str(&read(&out1.join("kre.pcrs.json"))).expect("pcrs json");
    for (i, pcr) in pcrs.iter().enumerate() {
        let line = format!("PCR{i}: {pcr}");
        assert!(printed1.contains(&line) && printed2.contains(&line), "`{line}` not printed: {printed1}");
        assert_eq!(written["Measurements"][format!("PCR{i}")], pcr.as_str());
    }
    println!("KRE test image PCRs: {pcrs:?}");

    // The custodian configuration is part of the image: another threshold, another PCR2 (and
    // PCR0), the same boot ramdisk (PCR1).
    let mut args = image_args(&blobs1, &genesis, &custodians, &enclave, &d.join("three"));
    let at = args.iter().position(|a| a == "--threshold").expect("threshold") + 1;
    args[at] = "3".into();
    ok(kre_image(&args));
    let other = described_pcrs(&d.join("three/kre.eif"));
    assert_eq!(other[1], pcrs[1]);
    assert_ne!(other[0], pcrs[0]);
    assert_ne!(other[2], pcrs[2]);
}

/// Unpacks every ramdisk of an EIF into `out/ramdisk<N>/` (regular files and directories only,
/// anything else fails): the section table as docs/eif.md "File layout" gives it, gzip, cpio
/// "newc". Python, because the test kit has no gzip.
const UNPACK_RAMDISKS: &str = r#"
import gzip, os, struct, sys
data = open(sys.argv[1], "rb").read()
ramdisks = []
for i in range(struct.unpack_from(">H", data, 26)[0]):
    off = struct.unpack_from(">Q", data, 28 + 8 * i)[0]
    kind, _, size = struct.unpack_from(">HHQ", data, off)
    if kind == 3:
        ramdisks.append(data[off + 12 : off + 12 + size])
for n, blob in enumerate(ramdisks, 1):
    cpio, pos = gzip.decompress(blob), 0
    while True:
        mode, size, namesize = (int(cpio[pos + 6 + 8 * k : pos + 14 + 8 * k], 16) for k in (1, 6, 11))
        name = cpio[pos + 110 : pos + 110 + namesize - 1].decode()
        body = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        path = os.path.join(sys.argv[2], "ramdisk%d" % n, name)
        if mode & 0o170000 == 0o040000:
            os.makedirs(path, exist_ok=True)
        elif mode & 0o170000 == 0o100000:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").write(cpio[body : body + size])
        else:
            sys.exit("unexpected entry %s (mode %o)" % (name, mode))
        pos = (body + size + 3) & ~3
"#;

#[test]
fn the_kre_image_holds_the_kre_and_a_configuration_the_kre_accepts() {
    let Some(dir) = dir_for_check_with("python3", "KRE image contents (python3 unpacks the ramdisks)") else {
        return;
    };
    let d = dir.path();
    let (genesis, custodians, digest) = genesis_custodians_and_digest(d);
    let enclave = enclave_binary(d);
    fake_blobs(&d.join("blobs"));
    ok(kre_image(&image_args(&d.join("blobs"), &genesis, &custodians, &enclave, &d.join("out"))));
    let unpacked = d.join("unpacked");
    let o = Command::new("python3").args(["-c", UNPACK_RAMDISKS]).arg(d.join("out/kre.eif")).arg(&unpacked).output();
    ok(o.expect("python3"));

    // Ramdisk 1: the boot blobs as given. Ramdisk 2: the KRE, its configuration, its argv.
    let same = |inside: &str, outside: &Path| {
        let got = std::fs::read(unpacked.join(inside)).unwrap_or_else(|e| panic!("{inside}: {e}"));
        assert!(got == std::fs::read(outside).expect("input"), "{inside} differs from {}", outside.display());
    };
    same("ramdisk1/init", &d.join("blobs/init"));
    same("ramdisk1/nsm.ko", &d.join("blobs/nsm.ko"));
    assert!(unpacked.join("ramdisk1/dev").is_dir());
    same("ramdisk2/rootfs/usr/bin/keygate-enclave", &enclave);
    same("ramdisk2/rootfs/etc/keygate/genesis.bundle", &genesis);
    for (i, c) in custodians.iter().enumerate() {
        same(&format!("ramdisk2/rootfs/etc/keygate/custodian-{}.pub.pem", i + 1), c);
    }
    let cmd = read(&unpacked.join("ramdisk2/cmd"));
    let argv: Vec<&str> = cmd.lines().collect();
    let mut want =
        vec!["/usr/bin/keygate-enclave", "--listen", "vsock:5000", "--genesis", "/etc/keygate/genesis.bundle"];
    want.extend(["--custodian", "/etc/keygate/custodian-1.pub.pem", "--custodian", "/etc/keygate/custodian-2.pub.pem"]);
    want.extend(["--custodian", "/etc/keygate/custodian-3.pub.pem", "--custodian-threshold", "2", "--log-json"]);
    assert_eq!(argv, want);

    // The KRE takes that configuration: the development binary (the same flags, plus the mock
    // NSM the production one lacks) started with the image's argv — its files read from the
    // unpacked rootfs, its release channel on a Unix socket instead of vsock — starts sealed
    // with the image's custodians and genesis policy.
    let rootfs = unpacked.join("ramdisk2/rootfs");
    let sock = d.join("kre.sock");
    let mut args: Vec<String> = argv[1..]
        .iter()
        .map(|a| match a.strip_prefix('/') {
            Some(inside) => path_arg(&rootfs.join(inside)),
            None => (*a).to_owned(),
        })
        .collect();
    args[1] = unix(&sock);
    let mut kre = Logged::start(dev_kre("deploy").args(&args), &d.join("kre.log"));
    kre.wait_for_socket(&sock);
    let o = keygate(&["status", "--kre", &format!("{}.parent", unix(&sock))]);
    let status = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "a fresh KRE with custodians is not serving: {status}");
    assert!(status.contains("sealed"), "{status}");
    assert!(status.contains("2 of 3"), "{status}");
    assert!(status.contains(&format!("version 1 (digest {}", &digest[..16])), "{status}\n{digest}");
}

#[test]
fn the_kre_image_script_refuses_a_development_binary_and_bad_usage() {
    let dir = TempDir::new("keygate-deploy-refuse").expect("tmp");
    let d = dir.path();
    let (genesis, custodians) = genesis_and_custodians(d);
    fake_blobs(&d.join("blobs"));
    let dev = d.join("keygate-enclave-dev");
    write_executable(&dev, "#!/bin/sh\necho 'keygate-enclave-dev 0.1.0 (NSM backends: hardware, mock)'\n");
    let args = image_args(&d.join("blobs"), &genesis, &custodians, &dev, &d.join("out"));
    exited(&kre_image(&args), 2, "is not the production keygate-enclave");
    assert!(!d.join("out/kre.eif").exists());

    let mut args = image_args(&d.join("blobs"), &genesis, &custodians, &bin("keygate-enclave"), &d.join("out"));
    let at = args.iter().position(|a| a == "--threshold").expect("threshold") + 1;
    args[at] = "4".into();
    exited(&kre_image(&args), 2, "--threshold must be between 1 and the number of custodians (3)");
    args[at] = "2".into();
    std::fs::remove_file(d.join("blobs/nsm.ko")).expect("rm");
    exited(&kre_image(&args), 2, "nsm.ko not found");
    exited(&kre_image(&["--bogus".to_owned()]), 2, "unknown argument --bogus");
    let help = ok(kre_image(&["--help".to_owned()]));
    assert!(help.contains("Usage:") && help.contains("--custodian PEM"), "{help}");
}

/// The unit files in deploy/systemd, by name.
fn units() -> Vec<(String, String)> {
    let mut units: Vec<_> = std::fs::read_dir(deploy().join("systemd"))
        .expect("deploy/systemd")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .map(|p| (p.file_name().expect("name").to_string_lossy().into_owned(), read(&p)))
        .collect();
    units.sort();
    units
}

/// A unit's logical lines (continuations joined with one space, comments dropped).
fn directives(unit: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in unit.lines() {
        let line = raw.trim();
        if current.is_empty() && (line.starts_with('#') || line.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

#[test]
fn the_systemd_units_say_what_the_deployment_needs() {
    let units = units();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["keygate-kms-plugin.service", "keygate-kre.service", "keygate-parent.service"]);
    let has = |name: &str, want: &str| {
        let unit = &units.iter().find(|(n, _)| n == name).expect("unit").1;
        assert!(directives(unit).iter().any(|l| l == want), "{name} lacks `{want}`");
    };
    for want in [
        "Before=kubelet.service",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RuntimeDirectory=keygate",
        "RuntimeDirectoryPreserve=yes",
        "LimitCORE=0",
    ] {
        has("keygate-kms-plugin.service", want);
    }
    for want in [
        "ExecStart=/usr/local/bin/keygate parent --config /etc/keygate/parent.toml",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        has("keygate-parent.service", want);
    }
    has(
        "keygate-kre.service",
        "ExecStart=/usr/bin/nitro-cli run-enclave --eif-path /usr/share/keygate/kre.eif --cpu-count 2 --memory 1024 --enclave-cid 16 --enclave-name keygate-kre",
    );
    for (name, unit) in &units {
        assert!(directives(unit).iter().all(|l| !l.contains("--debug-mode")), "{name} starts a debug enclave");
    }
    // The example parent.toml has every key the daemon documents, each once.
    let toml = read(&deploy().join("parent.toml"));
    for key in
        ["kre_parent", "release_listen", "release_to", "custodian_listen", "custodian_to", "state_dir", "audit_dir"]
    {
        let n = toml.lines().filter(|l| l.starts_with(&format!("{key} = \""))).count();
        assert_eq!(n, 1, "parent.toml: {key}");
    }
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(dir) = dir_for_check_with("systemd-analyze", "systemd-analyze verify") else {
        return;
    };
    // verify checks that ExecStart's program exists and that Requires= units load. keygate and
    // nitro-cli are not installed here, nor nitro-cli's allocator unit: the units are verified
    // as copies whose two program paths point at stand-in executables, beside a stand-in
    // allocator unit. Nothing else is changed, and any output at all fails the test.
    let d = dir.path();
    let stub = |name: &str| {
        let p = d.join(name);
        write_executable(&p, "#!/bin/sh\nexit 0\n");
        path_arg(&p)
    };
    let (keygate_stub, nitro_stub) = (stub("keygate"), stub("nitro-cli"));
    std::fs::write(
        d.join("nitro-enclaves-allocator.service"),
        format!("[Unit]\nDescription=stand-in\n[Service]\nType=oneshot\nExecStart={nitro_stub}\n"),
    )
    .expect("allocator");
    for (name, unit) in units() {
        let copy = unit.replace("/usr/local/bin/keygate", &keygate_stub).replace("/usr/bin/nitro-cli", &nitro_stub);
        std::fs::write(d.join(&name), copy).expect("unit");
        let o = run_with_limit(
            Command::new("systemd-analyze").arg("verify").arg(d.join(&name)).current_dir(d),
            Duration::from_secs(60),
        );
        let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && said.trim().is_empty(), "systemd-analyze verify {name}: {said}");
    }
}

/// Every document of a YAML file, as JSON (PyYAML's safe loader); None without PyYAML.
fn yaml_documents(p: &Path) -> Option<Vec<serde_json::Value>> {
    let script = "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let o = Command::new("python3").args(["-c", script]).arg(p).output().ok()?;
    if !o.status.success() {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("No module named 'yaml'"), "{} does not parse: {e}", p.display());
        return None;
    }
    Some(serde_json::from_slice(&o.stdout).expect("json"))
}

/// The strings of a JSON array.
fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(serde_json::Value::as_str).collect()).unwrap_or_default()
}

#[test]
fn the_static_pod_runs_the_kms_plugin_beside_kube_apiserver_on_a_shared_socket() {
    let pod_file = deploy().join("kubernetes/kube-apiserver.yaml");
    let enc_file = deploy().join("kubernetes/encryption-config.yaml");
    // Without PyYAML, the lines that matter, as written.
    let pod_text = read(&pod_file);
    for line in [
        "kind: Pod",
        "    - name: keygate-kms-plugin",
        "    - name: kms-socket",
        "        - unix:/var/run/keygate/kms.sock",
    ] {
        assert!(pod_text.lines().any(|l| l == line), "kube-apiserver.yaml lacks `{line}`");
    }
    assert!(read(&enc_file).contains("endpoint: unix:///var/run/keygate/kms.sock"));
    let (Some(pod), Some(enc)) = (yaml_documents(&pod_file), yaml_documents(&enc_file)) else {
        println!("SKIPPED YAML parse of deploy/kubernetes: python3 with PyYAML is not available (line checks ran)");
        return;
    };
    assert_eq!(pod.len(), 1);
    let pod = &pod[0];
    assert_eq!((pod["apiVersion"].as_str(), pod["kind"].as_str()), (Some("v1"), Some("Pod")));
    assert_eq!(pod["metadata"]["namespace"], "kube-system");
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    let container = |name: &str| containers.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    let mounts_socket = |c: &serde_json::Value| {
        c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "kms-socket" && m["mountPath"] == "/var/run/keygate")
    };

    let apiserver = container("kube-apiserver");
    assert!(strings(&apiserver["command"])
        .contains(&"--encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml"));
    assert!(mounts_socket(apiserver));
    let plugin = container("keygate-kms-plugin");
    let command = strings(&plugin["command"]);
    assert_eq!(command[1..4], ["kms-plugin", "--listen", "unix:/var/run/keygate/kms.sock"]);
    assert_eq!(command.iter().filter(|a| **a == "--expect-kre-pcr").count(), 3);
    assert!(mounts_socket(plugin));
    let volumes = spec["volumes"].as_array().expect("volumes");
    let socket = volumes.iter().find(|v| v["name"] == "kms-socket").expect("the socket volume");
    assert!(socket.get("emptyDir").is_some() || socket.get("hostPath").is_some(), "{socket}");
    // Every mounted volume is declared.
    for c in containers {
        for m in c["volumeMounts"].as_array().expect("mounts") {
            assert!(volumes.iter().any(|v| v["name"] == m["name"]), "{} mounts an undeclared {}", c["name"], m["name"]);
        }
    }

    assert_eq!(enc.len(), 1);
    assert_eq!(enc[0]["kind"], "EncryptionConfiguration");
    let kms = &enc[0]["resources"][0]["providers"][0]["kms"];
    assert_eq!(kms["apiVersion"], "v2");
    assert_eq!(kms["endpoint"], "unix:///var/run/keygate/kms.sock");
    assert_eq!(kms["timeout"], "3s");
    assert!(strings(&enc[0]["resources"][0]["resources"]).contains(&"secrets"));
}
