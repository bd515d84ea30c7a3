//! The container image and the Kubernetes manifests agree with each other, with the policy
//! they ship and with Keel's defaults.
//!
//! Reads `deploy/Dockerfile` (its runtime stage) and the overlays as kustomize renders them,
//! `deploy/kubernetes/rendered/{dev,production}.yaml` (`deploy/kubernetes/check.sh` fails
//! when those files are stale), and checks that: the container runs the binary the image
//! installs; the exposed ports are the container ports, the Services' target ports, the
//! probes' port and the policy's listeners, and Keel's defaults; the pod runs as the image's
//! numeric user, non-root, read-only, without privileges; the grace period outlasts the
//! preStop sleep plus the policy's drain grace and drain timeout; the probes are gRPC probes
//! of `liveness` and `readiness` on a listener without TLS (the kubelet's gRPC probes speak
//! plaintext); the policy is mounted as a directory; the admin token comes from a Secret;
//! the certificate files the policy names are mounted, readable, from keys the Secret has;
//! a DNS upstream names a headless Service of the overlay on a port it has; the
//! ServiceMonitor scrapes the admin port as job "keel" and the PrometheusRule holds the
//! alerting rules of `deploy/observability/prometheus/alerts.yml`.
//!
//! Every check is a line in [`problems`]; `every_check_can_fail` breaks the inputs one way
//! at a time and expects the matching problem.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use keel::policy::{Endpoints, Files, Policy, PolicyErrors, ServerSettings};
use serde::Deserialize;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What the runtime stage of the Dockerfile says.
#[derive(Clone, Debug)]
struct Image {
    /// Where the binary is copied to (`COPY --from=... SRC DEST`).
    binary: String,
    /// `ENTRYPOINT`, exec form.
    entrypoint: Vec<String>,
    /// The numeric uid of `USER`; `None` if `USER` is missing or not numeric.
    user: Option<u32>,
    /// `EXPOSE` ports.
    exposed: BTreeSet<u16>,
}

/// Parses the last stage of a Dockerfile (after the last `FROM`).
fn parse_dockerfile(text: &str) -> Image {
    // Join continuation lines; drop comments and blank lines.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            lines.push(std::mem::take(&mut current));
        }
    }
    let last_from = lines
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    let mut image = Image {
        binary: String::new(),
        entrypoint: Vec::new(),
        user: None,
        exposed: BTreeSet::new(),
    };
    for line in &lines[last_from + 1..] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        let words: Vec<&str> = rest.split_whitespace().collect();
        match instruction.to_ascii_uppercase().as_str() {
            "COPY" if words.iter().any(|w| w.starts_with("--from=")) => {
                image.binary = words.last().unwrap().to_string();
            }
            "USER" => {
                image.user = words[0].split(':').next().unwrap().parse().ok();
            }
            "EXPOSE" => {
                for w in words {
                    image
                        .exposed
                        .insert(w.trim_end_matches("/tcp").parse().unwrap());
                }
            }
            "ENTRYPOINT" => {
                image.entrypoint = serde_json::from_str(rest).expect("ENTRYPOINT in exec form");
            }
            _ => {}
        }
    }
    image
}

/// Every object of a multi-document YAML file.
fn parse_yaml(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses the policy of a ConfigMap as `keel validate --skip-files` does: the certificate
/// files it names exist only in the pod (the checks below see that they are mounted).
fn parse_policy(text: &str) -> Result<Policy, PolicyErrors> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, text).unwrap();
    Policy::load_with(&file, Files::Skip)
}

fn read(path: &str) -> String {
    let path = Path::new(ROOT).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The inputs of the checks, loaded from the repository.
#[derive(Clone)]
struct Inputs {
    image: Image,
    objects: Vec<Value>,
    /// deploy/observability/prometheus/alerts.yml.
    alerts: Value,
    /// deploy/kubernetes/overlays/production/secret.example.yaml: the Secret the production
    /// overlay expects to exist.
    secret_example: Value,
}

fn inputs(overlay: &str) -> Inputs {
    Inputs {
        image: parse_dockerfile(&read("deploy/Dockerfile")),
        objects: parse_yaml(&read(&format!("deploy/kubernetes/rendered/{overlay}.yaml"))),
        alerts: parse_yaml(&read("deploy/observability/prometheus/alerts.yml")).remove(0),
        secret_example: parse_yaml(&read(
            "deploy/kubernetes/overlays/production/secret.example.yaml",
        ))
        .remove(0),
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn find_mut<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    objects
        .iter_mut()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// A port given by number or by the container port's name.
fn resolve(port: &Value, named: &BTreeMap<String, u16>) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => named.get(s).copied(),
        _ => None,
    }
}

/// Everything that disagrees, one line each; empty when all is well.
fn problems(inputs: &Inputs) -> Vec<String> {
    let mut p = Vec::new();
    let Inputs {
        image,
        objects,
        alerts,
        secret_example,
    } = inputs;
    let defaults = ServerSettings::default();
    // Whether Secret `name` (in the overlay, or the example the overlay expects) has `key`.
    let secret_has = |name: &str, key: &str| {
        let secret = find(objects, "Secret", name)
            .or_else(|| (secret_example["metadata"]["name"] == name).then_some(secret_example));
        secret.is_some_and(|s| s["data"].get(key).is_some() || s["stringData"].get(key).is_some())
    };

    // The image.
    if image.entrypoint != [image.binary.clone()] {
        p.push(format!(
            "Dockerfile: ENTRYPOINT {:?} is not the binary copied to {}",
            image.entrypoint, image.binary
        ));
    }
    if !matches!(image.user, Some(uid) if uid != 0) {
        p.push("Dockerfile: USER is not a numeric, non-root uid".into());
    }
    let keel_ports: BTreeSet<u16> = [defaults.listen.port(), defaults.admin_listen.port()].into();
    if image.exposed != keel_ports {
        p.push(format!(
            "Dockerfile: EXPOSE {:?} is not Keel's default listen and admin_listen ports {keel_ports:?}",
            image.exposed
        ));
    }

    let Some(deployment) = find(objects, "Deployment", "keel") else {
        p.push("no Deployment keel".into());
        return p;
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let Some(c) = array(&pod["containers"])
        .iter()
        .find(|c| c["name"] == "keel")
    else {
        p.push("no container keel".into());
        return p;
    };

    // The binary.
    if c["command"] != serde_json::json!([image.binary]) {
        p.push(format!(
            "container command {} is not the image's binary {}",
            c["command"], image.binary
        ));
    }

    // Ports, by name.
    let named: BTreeMap<String, u16> = array(&c["ports"])
        .iter()
        .map(|port| {
            (
                port["name"].as_str().unwrap_or_default().to_string(),
                port["containerPort"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    let container_ports: BTreeSet<u16> = named.values().copied().collect();
    if container_ports != image.exposed {
        p.push(format!(
            "containerPorts {container_ports:?} are not the Dockerfile's EXPOSE {:?}",
            image.exposed
        ));
    }
    let (Some(&grpc), Some(&admin)) = (named.get("grpc"), named.get("admin")) else {
        p.push(format!(
            "container ports {named:?} lack the names grpc and admin"
        ));
        return p;
    };
    if grpc != defaults.listen.port() || admin != defaults.admin_listen.port() {
        p.push(format!(
            "container ports grpc {grpc} and admin {admin} are not Keel's defaults {} and {}",
            defaults.listen.port(),
            defaults.admin_listen.port()
        ));
    }

    // The policy: `--config` names a file in a ConfigMap volume mounted as a directory.
    let args: Vec<&str> = array(&c["args"]).iter().filter_map(Value::as_str).collect();
    let config = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1));
    let mut policy = None;
    match config {
        None => p.push("the container has no --config argument".into()),
        Some(path) => {
            let found = array(&c["volumeMounts"]).iter().find_map(|m| {
                let key = path.strip_prefix(&format!("{}/", m["mountPath"].as_str()?))?;
                Some((m, key))
            });
            match found {
                None => p.push(format!("--config {path} is in no volume mount")),
                Some((mount, key)) => {
                    if mount.get("subPath").is_some() {
                        p.push(format!(
                            "the policy volume is mounted with subPath: ConfigMap updates never reach it ({path})"
                        ));
                    }
                    let volume = array(&pod["volumes"])
                        .iter()
                        .find(|v| v["name"] == mount["name"]);
                    let cm_name = volume.and_then(|v| v["configMap"]["name"].as_str());
                    let text = cm_name
                        .and_then(|n| find(objects, "ConfigMap", n))
                        .and_then(|cm| cm["data"][key].as_str());
                    match text {
                        None => p.push(format!(
                            "--config {path}: no ConfigMap key {key} behind that mount"
                        )),
                        Some(text) => match parse_policy(text) {
                            Ok(parsed) => policy = Some(parsed),
                            Err(e) => p.push(format!("the ConfigMap's policy is invalid: {e:?}")),
                        },
                    }
                }
            }
        }
    }

    if let Some(policy) = &policy {
        let s = &policy.server;
        if s.listen.port() != grpc || !s.listen.ip().is_unspecified() {
            p.push(format!(
                "policy server.listen {} is not 0.0.0.0 on the grpc container port {grpc}",
                s.listen
            ));
        }
        if s.admin_listen.port() != admin || !s.admin_listen.ip().is_unspecified() {
            p.push(format!(
                "policy server.admin_listen {} is not 0.0.0.0 on the admin container port {admin}",
                s.admin_listen
            ));
        }

        // The admin token: from a Secret that has the key.
        match &s.admin_token_env {
            None => p.push("policy server.admin_token_env is not set".into()),
            Some(var) => {
                let env = array(&c["env"]).iter().find(|e| e["name"] == var.as_str());
                let secret_ref = env.map(|e| &e["valueFrom"]["secretKeyRef"]);
                match secret_ref.filter(|r| r.is_object()) {
                    None => p.push(format!(
                        "the container does not take {var} (server.admin_token_env) from a Secret"
                    )),
                    Some(r) => {
                        let (name, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                        if !secret_has(name, key) {
                            p.push(format!(
                                "{var} comes from Secret {name} key {key}, which neither the overlay nor secret.example.yaml has"
                            ));
                        }
                    }
                }
            }
        }

        // The certificate and key-hash files the policy names: in a Secret volume, from a
        // key the Secret has, readable by Keel's user (not root: through the file's group,
        // fsGroup).
        let key_files = policy.tenants.iter().filter_map(|(name, t)| {
            Some((format!("tenants.{name}.api_keys_file"), t.key_file.clone()?))
        });
        let files = [("server.tls", &s.tls), ("server.admin_tls", &s.admin_tls)]
            .into_iter()
            .filter_map(|(at, tls)| Some((at, tls.as_ref()?)))
            .flat_map(|(at, tls)| {
                [
                    ("cert", Some(&tls.cert)),
                    ("key", Some(&tls.key)),
                    ("client_ca", tls.client_ca.as_ref()),
                ]
                .into_iter()
                .filter_map(move |(k, path)| Some((format!("{at}.{k}"), path?.clone())))
            })
            .chain(key_files);
        for (at, path) in files {
            let mounted = array(&c["volumeMounts"]).iter().find_map(|m| {
                let rel = path.strip_prefix(m["mountPath"].as_str()?).ok()?;
                let volume = array(&pod["volumes"])
                    .iter()
                    .find(|v| v["name"] == m["name"] && v["secret"].is_object())?;
                Some((rel.to_string_lossy().into_owned(), &volume["secret"]))
            });
            let Some((rel, secret)) = mounted else {
                p.push(format!(
                    "{at} {} is in no Secret volume mount",
                    path.display()
                ));
                continue;
            };
            let name = secret["secretName"].as_str().unwrap_or_default();
            let items = secret["items"].as_array();
            let item = match items {
                None => Some((rel.clone(), None)),
                Some(items) => items.iter().find(|i| i["path"] == rel.as_str()).map(|i| {
                    (
                        i["key"].as_str().unwrap_or_default().to_string(),
                        i["mode"].as_u64(),
                    )
                }),
            };
            let Some((key, mode)) = item else {
                p.push(format!(
                    "{at} {}: the Secret {name} volume has no item for {rel}",
                    path.display()
                ));
                continue;
            };
            if !secret_has(name, &key) {
                p.push(format!(
                    "{at} {} comes from Secret {name} key {key}, which neither the overlay nor secret.example.yaml has",
                    path.display()
                ));
            }
            // Files are root's; Keel's non-root user reads them as "other", or through
            // the group when the pod has an fsGroup (which the kubelet gives the files).
            let mode = mode.or(secret["defaultMode"].as_u64()).unwrap_or(0o644);
            let group = pod["securityContext"]["fsGroup"].is_u64();
            if mode & 0o004 == 0 && !(group && mode & 0o040 != 0) {
                p.push(format!(
                    "{at} {} (mode {mode:o}) is not readable by Keel's user{}",
                    path.display(),
                    if group { "" } else { " (no fsGroup)" }
                ));
            }
        }

        // A DNS upstream resolves a headless Service of the overlay (one address per pod),
        // on a port the Service has.
        for (name, up) in &policy.upstreams {
            if let Endpoints::Dns { host, port, .. } = &up.endpoints {
                let at = format!("upstreams.{name}.dns {host}:{port}");
                let service = host.split('.').next().unwrap_or(host);
                match find(objects, "Service", service) {
                    None => p.push(format!("{at}: no Service {service} in the overlay")),
                    Some(svc) => {
                        if svc["spec"]["clusterIP"] != "None" {
                            p.push(format!(
                                "{at}: Service {service} is not headless (clusterIP: None), so DNS answers one virtual IP"
                            ));
                        }
                        if !array(&svc["spec"]["ports"])
                            .iter()
                            .any(|x| x["port"].as_u64() == Some(u64::from(*port)))
                        {
                            p.push(format!("{at}: Service {service} has no port {port}"));
                        }
                    }
                }
            }
        }

        // The audit log must be on a writable volume: the root filesystem is read-only.
        let writable = |path: &Path| {
            array(&c["volumeMounts"]).iter().any(|m| {
                m["readOnly"] != true
                    && path.starts_with(m["mountPath"].as_str().unwrap_or("/nowhere"))
                    && array(&pod["volumes"])
                        .iter()
                        .any(|v| v["name"] == m["name"] && v["emptyDir"].is_object())
            })
        };
        match &s.audit_log {
            Some(path) if writable(path) => {}
            other => p.push(format!(
                "policy server.audit_log {other:?} is not on a writable emptyDir mount"
            )),
        }

        // The grace period outlasts the preStop sleep and the drain.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        let drain = (s.drain_grace + s.drain_timeout).as_secs_f64();
        if (grace as f64) <= sleep as f64 + drain {
            p.push(format!(
                "terminationGracePeriodSeconds {grace} is not longer than the preStop sleep {sleep}s plus server.drain_grace and server.drain_timeout ({drain}s)"
            ));
        }
    }

    // Probes: gRPC, asking for liveness and readiness, on a listener without TLS: the
    // kubelet's gRPC probes speak plaintext. Both listeners serve the same health service.
    let plaintext: BTreeSet<u16> = match &policy {
        Some(policy) => [
            (grpc, policy.server.tls.is_none()),
            (admin, policy.server.admin_tls.is_none()),
        ]
        .into_iter()
        .filter_map(|(port, plain)| plain.then_some(port))
        .collect(),
        None => [grpc].into(),
    };
    for (probe, service) in [
        ("startupProbe", "liveness"),
        ("livenessProbe", "liveness"),
        ("readinessProbe", "readiness"),
    ] {
        let g = &c[probe]["grpc"];
        if !g.is_object() {
            p.push(format!("{probe} is not a gRPC probe"));
            continue;
        }
        if !g["port"]
            .as_u64()
            .is_some_and(|port| plaintext.iter().any(|&x| u64::from(x) == port))
        {
            p.push(format!(
                "{probe} asks port {}, which is not a listener without TLS ({plaintext:?}): the kubelet's gRPC probes speak plaintext",
                g["port"]
            ));
        }
        if g["service"] != service {
            p.push(format!(
                "{probe} asks service {}, not {service}",
                g["service"]
            ));
        }
    }
    let pre_stop = &c["lifecycle"]["preStop"];
    if pre_stop.is_object() && pre_stop.as_object().unwrap().keys().any(|k| k != "sleep") {
        p.push(format!(
            "preStop {pre_stop} is not a sleep action: the image has no shell"
        ));
    }

    // Security.
    if pod["securityContext"]["runAsUser"].as_u64() != image.user.map(u64::from) {
        p.push(format!(
            "runAsUser {} is not the Dockerfile's USER {:?}",
            pod["securityContext"]["runAsUser"], image.user
        ));
    }
    if pod["securityContext"]["runAsNonRoot"] != true {
        p.push("runAsNonRoot is not true".into());
    }
    let sc = &c["securityContext"];
    if sc["readOnlyRootFilesystem"] != true {
        p.push("readOnlyRootFilesystem is not true".into());
    }
    if sc["allowPrivilegeEscalation"] != false {
        p.push("allowPrivilegeEscalation is not false".into());
    }
    if sc["capabilities"]["drop"] != serde_json::json!(["ALL"]) {
        p.push("capabilities are not drop: [ALL]".into());
    }

    // Spread over nodes and zones.
    let keys: BTreeSet<&str> = array(&pod["topologySpreadConstraints"])
        .iter()
        .filter_map(|t| t["topologyKey"].as_str())
        .collect();
    for key in ["kubernetes.io/hostname", "topology.kubernetes.io/zone"] {
        if !keys.contains(key) {
            p.push(format!("no topology spread over {key}"));
        }
    }

    // Services: traffic and admin reach the right container ports.
    for (name, want, app_protocol) in [("keel", grpc, Some("grpc")), ("keel-admin", admin, None)] {
        let Some(svc) = find(objects, "Service", name) else {
            p.push(format!("no Service {name}"));
            continue;
        };
        if !selects(&svc["spec"]["selector"], pod_labels) {
            p.push(format!("Service {name} does not select the pods"));
        }
        for port in array(&svc["spec"]["ports"]) {
            let target = resolve(&port["targetPort"], &named);
            if target != Some(want) {
                p.push(format!(
                    "Service {name} targetPort {} is not container port {want}",
                    port["targetPort"]
                ));
            }
            if let Some(proto) = app_protocol
                && port["appProtocol"] != proto
            {
                p.push(format!("Service {name} port has no appProtocol {proto}"));
            }
        }
    }

    // The disruption budget and the network policy cover the pods.
    match find(objects, "PodDisruptionBudget", "keel") {
        Some(pdb) if selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels) => {}
        _ => p.push("no PodDisruptionBudget keel selecting the pods".into()),
    }
    match find(objects, "NetworkPolicy", "keel") {
        None => p.push("no NetworkPolicy keel".into()),
        Some(np) => {
            if !selects(&np["spec"]["podSelector"]["matchLabels"], pod_labels) {
                p.push("NetworkPolicy keel does not select the pods".into());
            }
            let rules = array(&np["spec"]["ingress"]);
            let rule_for = |port: u16| {
                rules.iter().find(|r| {
                    array(&r["ports"])
                        .iter()
                        .any(|x| resolve(&x["port"], &named) == Some(port))
                })
            };
            if !rule_for(grpc).is_some_and(|r| array(&r["from"]).is_empty()) {
                p.push(format!(
                    "NetworkPolicy does not open the traffic port {grpc} to every client"
                ));
            }
            let admin_only_from_namespaces = rule_for(admin).is_some_and(|r| {
                !array(&r["from"]).is_empty()
                    && array(&r["from"])
                        .iter()
                        .all(|f| f["namespaceSelector"].is_object() && f.get("ipBlock").is_none())
            });
            if !admin_only_from_namespaces {
                p.push(format!(
                    "NetworkPolicy does not keep the admin port {admin} to selected namespaces"
                ));
            }
        }
    }
    if let Some(hpa) = find(objects, "HorizontalPodAutoscaler", "keel") {
        let target = &hpa["spec"]["scaleTargetRef"];
        if target["kind"] != "Deployment" || target["name"] != "keel" {
            p.push("the HorizontalPodAutoscaler does not scale Deployment keel".into());
        }
        if deployment["spec"].get("replicas").is_some() {
            p.push(
                "the Deployment sets replicas although an HPA scales it (apply would reset it)"
                    .into(),
            );
        }
    }

    // Prometheus operator objects, when the overlay has them.
    if let Some(sm) = find(objects, "ServiceMonitor", "keel") {
        let admin_svc = find(objects, "Service", "keel-admin");
        let svc_labels = admin_svc.map_or(&Value::Null, |s| &s["metadata"]["labels"]);
        if !selects(&sm["spec"]["selector"]["matchLabels"], svc_labels) {
            p.push("ServiceMonitor keel does not select Service keel-admin".into());
        }
        let port_names: BTreeSet<&str> = admin_svc
            .map(|s| array(&s["spec"]["ports"]))
            .unwrap_or_default()
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        for e in array(&sm["spec"]["endpoints"]) {
            if !e["port"].as_str().is_some_and(|n| port_names.contains(n)) {
                p.push(format!(
                    "ServiceMonitor endpoint port {} is not a port of Service keel-admin",
                    e["port"]
                ));
            }
            if e["path"] != "/metrics" {
                p.push(format!("ServiceMonitor path {} is not /metrics", e["path"]));
            }
        }
        // The alerting rules select job="keel".
        let job = sm["spec"]["jobLabel"]
            .as_str()
            .map(|l| &svc_labels[l])
            .unwrap_or(&Value::Null);
        if job != "keel" {
            p.push(format!(
                "ServiceMonitor's job is {job}, not \"keel\" as the alerting rules expect"
            ));
        }
    }
    if let Some(rule) = find(objects, "PrometheusRule", "keel")
        && rule["spec"] != *alerts
    {
        p.push("PrometheusRule keel is not deploy/observability/prometheus/alerts.yml".into());
    }
    p
}

fn assert_no_problems(overlay: &str, inputs: &Inputs) {
    let p = problems(inputs);
    assert!(
        p.is_empty(),
        "{overlay}:\n  {}\n(rendered/{overlay}.yaml comes from `deploy/kubernetes/check.sh --write`)",
        p.join("\n  ")
    );
}

#[test]
fn the_dev_overlay_agrees_with_the_image_its_policy_and_keels_defaults() {
    let inputs = inputs("dev");
    assert_no_problems("dev", &inputs);
    let deployment = find(&inputs.objects, "Deployment", "keel").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 1, "dev runs one replica");
    assert!(find(&inputs.objects, "HorizontalPodAutoscaler", "keel").is_none());
}

#[test]
fn the_production_overlay_agrees_with_the_image_its_policy_and_keels_defaults() {
    let inputs = inputs("production");
    assert_no_problems("production", &inputs);
    let hpa = find(&inputs.objects, "HorizontalPodAutoscaler", "keel").unwrap();
    assert_eq!(
        hpa["spec"]["minReplicas"], 3,
        "production runs three or more"
    );
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(find(&inputs.objects, kind, "keel").is_some(), "no {kind}");
    }
    // The production policy forwards to an upstream (no embedded models).
    let policy = find(&inputs.objects, "ConfigMap", "keel-policy").unwrap()["data"]["policy.toml"]
        .as_str()
        .unwrap();
    let policy = parse_policy(policy).unwrap();
    assert!(!policy.upstreams.is_empty(), "production forwards upstream");
    assert!(
        policy
            .upstreams
            .values()
            .all(|u| matches!(u.endpoints, Endpoints::Dns { .. })),
        "production finds the model server's pods through DNS"
    );
    assert!(policy.server.tls.is_some(), "production serves TLS");
    assert!(
        policy.tenants.values().any(|t| t.key_file.is_some()),
        "production reads its tenants' key hashes from the Secret"
    );
}

#[test]
fn the_dockerfile_parser_reads_the_runtime_stage() {
    let image = parse_dockerfile(&read("deploy/Dockerfile"));
    assert_eq!(image.binary, "/usr/local/bin/keel");
    assert_eq!(image.entrypoint, ["/usr/local/bin/keel"]);
    assert_eq!(image.user, Some(65532));
    assert_eq!(image.exposed, BTreeSet::from([8001, 8002]));
}

/// Breaks one thing at a time and expects the problem that names it.
#[test]
fn every_check_can_fail() {
    let good = inputs("production");
    type Break = Box<dyn Fn(&mut Inputs)>;
    fn deployment(i: &mut Inputs) -> &mut Value {
        find_mut(&mut i.objects, "Deployment", "keel")
    }
    fn container(i: &mut Inputs) -> &mut Value {
        &mut deployment(i)["spec"]["template"]["spec"]["containers"][0]
    }
    let policy_edit = |from: &'static str, to: &'static str| -> Break {
        Box::new(move |i: &mut Inputs| {
            let cm = find_mut(&mut i.objects, "ConfigMap", "keel-policy");
            let text = cm["data"]["policy.toml"].as_str().unwrap();
            assert!(text.contains(from), "the policy has no {from:?}");
            cm["data"]["policy.toml"] = text.replace(from, to).into();
        })
    };
    let cases: Vec<(&str, Break)> = vec![
        (
            "ENTRYPOINT",
            Box::new(|i| i.image.entrypoint = vec!["/bin/keel".into()]),
        ),
        (
            "container command",
            Box::new(move |i| i.image.binary = "/app/keel".into()),
        ),
        ("USER is not a numeric", Box::new(|i| i.image.user = None)),
        (
            "EXPOSE",
            Box::new(|i| i.image.exposed = [8001, 9090].into()),
        ),
        ("runAsUser", Box::new(|i| i.image.user = Some(1000))),
        (
            "containerPorts",
            Box::new(move |i| container(i)["ports"][1]["containerPort"] = 9002.into()),
        ),
        (
            "server.listen",
            policy_edit("listen = \"0.0.0.0:8001\"", "listen = \"0.0.0.0:9001\""),
        ),
        (
            "server.listen",
            policy_edit("listen = \"0.0.0.0:8001\"", "listen = \"127.0.0.1:8001\""),
        ),
        (
            "server.admin_listen",
            policy_edit(
                "admin_listen = \"0.0.0.0:8002\"",
                "admin_listen = \"0.0.0.0:9002\"",
            ),
        ),
        (
            "terminationGracePeriodSeconds",
            policy_edit("drain_timeout = \"25s\"", "drain_timeout = \"45s\""),
        ),
        (
            "terminationGracePeriodSeconds",
            Box::new(move |i| {
                deployment(i)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
                    29.into()
            }),
        ),
        (
            "server.audit_log",
            policy_edit("audit_log = \"/var/lib/keel/policy-audit.jsonl\"", ""),
        ),
        (
            "admin_token_env",
            policy_edit(
                "admin_token_env = \"KEEL_ADMIN_TOKEN\"",
                "admin_token_env = \"OTHER\"",
            ),
        ),
        (
            "neither the overlay nor secret.example.yaml",
            Box::new(|i| {
                i.secret_example["stringData"] = serde_json::json!({"token": "x"});
            }),
        ),
        (
            "the ConfigMap's policy is invalid",
            policy_edit("[defaults]", "[defaults]\ntimout = \"1s\""),
        ),
        (
            "subPath",
            Box::new(move |i| container(i)["volumeMounts"][0]["subPath"] = "policy.toml".into()),
        ),
        (
            "no --config",
            Box::new(move |i| container(i)["args"] = serde_json::json!(["serve"])),
        ),
        (
            "readinessProbe asks service",
            Box::new(move |i| {
                container(i)["readinessProbe"]["grpc"]["service"] = "liveness".into()
            }),
        ),
        (
            "livenessProbe asks service",
            Box::new(move |i| container(i)["livenessProbe"]["grpc"]["service"] = "".into()),
        ),
        (
            "livenessProbe asks port 8001, which is not a listener without TLS",
            Box::new(move |i| container(i)["livenessProbe"]["grpc"]["port"] = 8001.into()),
        ),
        (
            "readinessProbe asks port 9000",
            Box::new(move |i| container(i)["readinessProbe"]["grpc"]["port"] = 9000.into()),
        ),
        (
            "server.tls.cert /etc/keel/tls/tls.crt is in no Secret volume mount",
            Box::new(move |i| {
                let mounts = container(i)["volumeMounts"].as_array_mut().unwrap();
                mounts.retain(|m| m["mountPath"] != "/etc/keel/tls");
            }),
        ),
        (
            "server.tls.key /etc/keel/tls/tls.key: the Secret keel volume has no item for tls.key",
            Box::new(move |i| {
                let volumes = deployment(i)["spec"]["template"]["spec"]["volumes"]
                    .as_array_mut()
                    .unwrap();
                let tls = volumes.iter_mut().find(|v| v["name"] == "tls").unwrap();
                tls["secret"]["items"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "server.tls.key /etc/keel/tls/tls.key comes from Secret keel key tls.key, which neither",
            Box::new(|i| {
                i.secret_example["stringData"]
                    .as_object_mut()
                    .unwrap()
                    .remove("tls.key");
            }),
        ),
        (
            "tenants.frontend.api_keys_file /etc/keel/keys/frontend comes from Secret keel key api-keys-frontend, which neither",
            Box::new(|i| {
                i.secret_example["stringData"]
                    .as_object_mut()
                    .unwrap()
                    .remove("api-keys-frontend");
            }),
        ),
        (
            "tenants.frontend.api_keys_file /etc/keel/keys/frontend is in no Secret volume mount",
            Box::new(move |i| {
                let mounts = container(i)["volumeMounts"].as_array_mut().unwrap();
                mounts.retain(|m| m["mountPath"] != "/etc/keel/keys");
            }),
        ),
        (
            "server.tls.key /etc/keel/tls/tls.key (mode 440) is not readable by Keel's user (no fsGroup)",
            Box::new(move |i| {
                deployment(i)["spec"]["template"]["spec"]["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("fsGroup");
            }),
        ),
        (
            "upstreams.triton.dns triton:8001: no Service triton in the overlay",
            policy_edit("dns = \"triton-headless:8001\"", "dns = \"triton:8001\""),
        ),
        (
            "upstreams.triton.dns triton-headless:9001: Service triton-headless has no port 9001",
            policy_edit(
                "dns = \"triton-headless:8001\"",
                "dns = \"triton-headless:9001\"",
            ),
        ),
        (
            "Service triton-headless is not headless",
            Box::new(|i| {
                find_mut(&mut i.objects, "Service", "triton-headless")["spec"]["clusterIP"] =
                    Value::Null;
            }),
        ),
        (
            "startupProbe is not a gRPC probe",
            Box::new(move |i| {
                container(i)["startupProbe"] = serde_json::json!({"tcpSocket": {"port": 8001}});
            }),
        ),
        (
            "not a sleep action",
            Box::new(move |i| {
                container(i)["lifecycle"]["preStop"] =
                    serde_json::json!({"exec": {"command": ["sleep", "5"]}});
            }),
        ),
        (
            "readOnlyRootFilesystem",
            Box::new(move |i| {
                container(i)["securityContext"]["readOnlyRootFilesystem"] = false.into()
            }),
        ),
        (
            "allowPrivilegeEscalation",
            Box::new(move |i| {
                container(i)["securityContext"]["allowPrivilegeEscalation"] = true.into()
            }),
        ),
        (
            "capabilities",
            Box::new(move |i| {
                container(i)["securityContext"]["capabilities"]["drop"] = serde_json::json!([])
            }),
        ),
        (
            "runAsNonRoot",
            Box::new(move |i| {
                deployment(i)["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] =
                    false.into()
            }),
        ),
        (
            "topology spread over topology.kubernetes.io/zone",
            Box::new(move |i| {
                deployment(i)["spec"]["template"]["spec"]["topologySpreadConstraints"] =
                    serde_json::json!([]);
            }),
        ),
        (
            "Service keel targetPort",
            Box::new(|i| {
                find_mut(&mut i.objects, "Service", "keel")["spec"]["ports"][0]["targetPort"] =
                    "admin".into();
            }),
        ),
        (
            "Service keel-admin targetPort",
            Box::new(|i| {
                find_mut(&mut i.objects, "Service", "keel-admin")["spec"]["ports"][0]["targetPort"] =
                    8001.into();
            }),
        ),
        (
            "appProtocol",
            Box::new(|i| {
                find_mut(&mut i.objects, "Service", "keel")["spec"]["ports"][0]["appProtocol"] =
                    Value::Null;
            }),
        ),
        (
            "does not select the pods",
            Box::new(|i| {
                find_mut(&mut i.objects, "Service", "keel")["spec"]["selector"] =
                    serde_json::json!({"app": "other"});
            }),
        ),
        (
            "PodDisruptionBudget",
            Box::new(|i| {
                find_mut(&mut i.objects, "PodDisruptionBudget", "keel")["spec"]["selector"]["matchLabels"] =
                    serde_json::json!({"a": "b"});
            }),
        ),
        (
            "admin port 8002 to selected namespaces",
            Box::new(|i| {
                find_mut(&mut i.objects, "NetworkPolicy", "keel")["spec"]["ingress"][1]["from"] =
                    serde_json::json!([]);
            }),
        ),
        (
            "traffic port 8001 to every client",
            Box::new(|i| {
                find_mut(&mut i.objects, "NetworkPolicy", "keel")["spec"]["ingress"][0]["from"] =
                    serde_json::json!([{"podSelector": {}}]);
            }),
        ),
        (
            "sets replicas although an HPA",
            Box::new(move |i| deployment(i)["spec"]["replicas"] = 3.into()),
        ),
        (
            "does not scale Deployment keel",
            Box::new(|i| {
                find_mut(&mut i.objects, "HorizontalPodAutoscaler", "keel")["spec"]["scaleTargetRef"]
                    ["name"] = "other".into();
            }),
        ),
        (
            "ServiceMonitor endpoint port",
            Box::new(|i| {
                find_mut(&mut i.objects, "ServiceMonitor", "keel")["spec"]["endpoints"][0]["port"] =
                    "metrics".into();
            }),
        ),
        (
            "not \"keel\" as the alerting rules expect",
            Box::new(|i| {
                find_mut(&mut i.objects, "ServiceMonitor", "keel")["spec"]["jobLabel"] =
                    Value::Null;
            }),
        ),
        (
            "PrometheusRule keel is not",
            Box::new(|i| {
                find_mut(&mut i.objects, "PrometheusRule", "keel")["spec"]["groups"][0]["rules"]
                    [0]["for"] = "10m".into();
            }),
        ),
    ];
    assert!(problems(&good).is_empty(), "{:?}", problems(&good));
    for (expected, breakage) in cases {
        let mut broken = good.clone();
        breakage(&mut broken);
        let found = problems(&broken);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "breaking {expected:?} went unnoticed; problems: {found:#?}"
        );
    }
}
