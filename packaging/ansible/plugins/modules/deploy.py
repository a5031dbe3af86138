#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: certctl developers
# Apache License 2.0 (see the LICENSE of https://github.com/certctl/certctl)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: deploy
short_description: Deploy a certificate to a certctl-agent target
description:
  - Runs C(certctl --json deploy) on the managed host. The agent checks the
    input, writes the files atomically, runs the target's validate and
    reload commands, verifies the served certificate and rolls back on any
    failure (see docs/deploy.md of certctl).
  - Reports C(changed) only when something was deployed. When the same
    material is already in place the agent answers C(unchanged) and the
    task is C(ok).
  - "Check mode runs C(certctl deploy --dry-run): the input is checked and the
    plan computed, nothing is locked, written or run. C(changed) then says
    whether a real run would write a file."
  - Diff mode shows what would change, before and after, by fingerprint,
    subject, expiry and the files written (never their content).
  - A failed deploy fails the task with the agent's reason, its outcome
    (C(rejected), C(validate_failed), C(rolled_back), C(rollback_failed),
    C(busy), C(internal)) and the CLI's exit code.
  - Certificate and key files are read on the controller by default (the
    action plugin reads them there and passes their content with
    C(no_log)); with C(remote_src=true) they are paths on the managed host.
    Content is written on the host to a 0600 file in a 0700 temporary
    directory that is removed when the task ends. Key material never
    appears in the task's result, its log or its diff.
version_added: "0.1.0"
author:
  - certctl developers
requirements:
  - certctl (the package's CLI) on the managed host, and an agent it can reach
options:
  target:
    description: The target's name, as configured in C(/etc/certctl/agent.toml).
    type: str
    required: true
  cert:
    description:
      - The certificate (PEM), the leaf optionally followed by its chain.
      - A path on the controller, or on the host with C(remote_src=true).
      - Mutually exclusive with C(bundle) and C(cert_content).
    type: path
  key:
    description:
      - The private key (PEM). A path on the controller, or on the host
        with C(remote_src=true). Required with C(cert).
    type: path
  chain:
    description: Intermediate certificates (PEM), in any order.
    type: path
  bundle:
    description:
      - One file holding the private key, the leaf and its chain in any
        order (what certbot's C(fullchain.pem) plus C(privkey.pem), or a
        drop file, hold).
      - Mutually exclusive with C(cert) and C(key).
    type: path
  remote_src:
    description:
      - C(false) (the default) reads C(cert), C(key), C(chain) and C(bundle)
        on the controller; C(true) reads them on the managed host.
    type: bool
    default: false
  cert_content:
    description: The certificate as text instead of a file.
    type: str
  key_content:
    description:
      - The private key as text instead of a file (for example from Ansible
        Vault). Never logged.
    type: str
  chain_content:
    description: The intermediates as text instead of a file.
    type: str
  bundle_content:
    description: A whole bundle as text instead of a file. Never logged.
    type: str
  verify:
    description: "C(false) passes C(--no-verify): no TLS check of the served certificate."
    type: bool
    default: true
  reload:
    description:
      - C(false) passes C(--no-reload), for the first certificate of a
        server that is not running yet. The result is C(unverified).
    type: bool
    default: true
  wait:
    description: C(false) passes C(--no-wait), failing at once when another deploy holds the target.
    type: bool
    default: true
  socket:
    description: The agent's socket; the CLI's default (C(/run/certctl/agent.sock)) when unset.
    type: path
notes:
  - Supports check mode (C(certctl deploy --dry-run)) and diff mode.
  - Enable SSH pipelining (C(ANSIBLE_PIPELINING=True)) so that the module,
    which carries key content for controller-side files, is sent on the SSH
    connection's standard input rather than written to the host's
    temporary directory.
seealso:
  - module: certctl.agent.status
"""

EXAMPLES = r"""
- name: Deploy the renewed certificate from the controller
  certctl.agent.deploy:
    target: web
    cert: "certs/{{ inventory_hostname }}/fullchain.pem"
    key: "certs/{{ inventory_hostname }}/privkey.pem"

- name: Deploy what certbot left on the host
  certctl.agent.deploy:
    target: web
    cert: /etc/letsencrypt/live/www.example.com/fullchain.pem
    key: /etc/letsencrypt/live/www.example.com/privkey.pem
    remote_src: true

- name: Deploy a key kept in Ansible Vault
  certctl.agent.deploy:
    target: mail
    cert: certs/mail.crt
    key_content: "{{ vault_mail_key }}"

- name: Stop the play on a rollback
  certctl.agent.deploy:
    target: web
    bundle: certs/web.pem
  register: deployed
  failed_when: deployed.failed or deployed.outcome == 'rolled_back'
"""

RETURN = r"""
target:
  description: The target.
  returned: always
  type: str
  sample: web
outcome:
  description:
    - The agent's outcome, C(deployed), C(unchanged), C(dry_run) (check mode),
      C(rejected), C(validate_failed), C(rolled_back), C(rollback_failed),
      C(busy) or C(internal); empty when the deploy did not start (agent
      unreachable, unknown target, unreadable input).
  returned: always
  type: str
  sample: deployed
error:
  description: The agent's reason when the deploy failed.
  returned: always
  type: str
  sample: "validate command `nginx -t` failed (exit 1): ..."
rc:
  description: The exit code of C(certctl deploy) (docs/cli.md, "Exit codes").
  returned: always
  type: int
  sample: 0
deploy_id:
  description: The deploy's id in the agent's journal (C(certctl history)).
  returned: when the deploy started
  type: str
  sample: 20261122T144939.032Z-c853
cert_sha256:
  description: SHA-256 of the new leaf (DER), lowercase hex.
  returned: when the input was checked
  type: str
subject:
  description: The new leaf's subject.
  returned: when the input was checked
  type: str
  sample: CN=www.example.com
not_after:
  description: The new leaf's expiry, RFC 3339 UTC.
  returned: when the input was checked
  type: str
  sample: "2027-02-20T00:00:00Z"
not_after_unix:
  description: The new leaf's expiry, seconds since the epoch.
  returned: when the input was checked
  type: int
verification:
  description: C(verified) or C(unverified) (docs/verification.md).
  returned: when the deploy finished
  type: str
disk_sha256:
  description: The leaf on disk when the deploy ended (after a rollback, the previous one).
  returned: when the deploy finished
  type: str
served_sha256:
  description: The leaf the endpoint served at the last probe; empty when not probed.
  returned: when the deploy finished
  type: str
warnings_agent:
  description: The agent's warnings about the deploy.
  returned: when the deploy finished
  type: list
  elements: str
duration_ms:
  description: How long the deploy took in the agent.
  returned: when the deploy finished
  type: int
files:
  description:
    - The files of the plan, each with C(path), C(role), C(mode), C(uid),
      C(gid), C(changed) (would be or was written) and, for certificates
      and chains only, C(sha256). Nothing derived from a key is returned.
  returned: when the plan was made
  type: list
  elements: dict
stages:
  description: Every stage the agent reported, with its message, in order.
  returned: when the deploy started
  type: list
  elements: dict
"""

import json
import os
import shutil
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule

# Roles whose files carry no key material: only these are returned with a hash.
PUBLIC_ROLES = ("cert", "chain")


def write_private(directory, name, text):
    """Writes text to a new 0600 file in directory (itself 0700)."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def stamp(unix):
    if not unix:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def public_files(files):
    out = []
    for f in files or []:
        item = {
            "path": f.get("path"),
            "role": f.get("role"),
            "mode": f.get("mode"),
            "uid": f.get("uid"),
            "gid": f.get("gid"),
            "changed": bool(f.get("changed")),
        }
        if f.get("role") in PUBLIC_ROLES:
            item["sha256"] = f.get("sha256")
        out.append(item)
    return out


def parse_events(stdout):
    """The JSON objects certctl printed, one a line; non-JSON lines are skipped."""
    events = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def current_state(module, base, target):
    """What `certctl status TARGET` says is on disk, for the diff's before."""
    rc, out, err = module.run_command(base + ["status", target])
    if rc != 0:
        return None
    try:
        doc = json.loads(out)
    except ValueError:
        return None
    for t in doc.get("targets", []):
        if t.get("name") == target:
            return t
    return None


def describe(sha256, subject, not_after_unix, files):
    lines = [
        "cert_sha256: %s" % (sha256 or "(none)"),
        "subject: %s" % (subject or ""),
        "not_after: %s" % stamp(not_after_unix),
    ]
    for f in files:
        lines.append(
            "file: %s %s mode %s%s"
            % (
                f["role"],
                f["path"],
                f["mode"],
                (" sha256 %s" % f["sha256"]) if f.get("sha256") else "",
            )
        )
    return "\n".join(lines) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            target=dict(type="str", required=True),
            cert=dict(type="path"),
            key=dict(type="path", no_log=False),
            chain=dict(type="path"),
            bundle=dict(type="path"),
            remote_src=dict(type="bool", default=False),
            cert_content=dict(type="str"),
            key_content=dict(type="str", no_log=True),
            chain_content=dict(type="str"),
            bundle_content=dict(type="str", no_log=True),
            verify=dict(type="bool", default=True),
            reload=dict(type="bool", default=True),
            wait=dict(type="bool", default=True),
            socket=dict(type="path"),
        ),
        mutually_exclusive=[
            ("cert", "cert_content"),
            ("key", "key_content"),
            ("chain", "chain_content"),
            ("bundle", "bundle_content"),
            ("bundle", "cert"),
            ("bundle", "cert_content"),
            ("bundle", "key"),
            ("bundle", "key_content"),
            ("bundle_content", "cert"),
            ("bundle_content", "cert_content"),
            ("bundle_content", "key"),
            ("bundle_content", "key_content"),
        ],
        required_one_of=[("cert", "cert_content", "bundle", "bundle_content")],
        supports_check_mode=True,
    )
    p = module.params
    target = p["target"]
    has_cert = p["cert"] is not None or p["cert_content"] is not None
    has_key = p["key"] is not None or p["key_content"] is not None
    if has_cert and not has_key:
        module.fail_json(
            msg="deploy %s: a certificate needs its key (key or key_content), "
            "or give the whole set as bundle" % target,
            target=target, outcome="", error="", rc=2,
        )
    if not p["remote_src"] and any(p[o] is not None for o in ("cert", "key", "chain", "bundle")):
        # The action plugin turns controller paths into *_content; a path
        # arriving here was given with the action plugin bypassed.
        module.fail_json(
            msg="deploy %s: cert, key, chain and bundle are paths on the controller "
            "unless remote_src is true (run the module through certctl.agent.deploy)" % target,
            target=target, outcome="", error="", rc=2,
        )

    certctl = module.get_bin_path("certctl", required=True)
    base = [certctl, "--json"]
    if p["socket"]:
        base += ["--socket", p["socket"]]

    # Content goes into a private temporary directory that is removed
    # whatever happens; certctl reads regular files only (no stdin).
    tmpdir = tempfile.mkdtemp(prefix="certctl-deploy-")
    try:
        os.chmod(tmpdir, 0o700)
        inputs = {}
        for name in ("cert", "key", "chain", "bundle"):
            if p[name + "_content"] is not None:
                inputs[name] = write_private(tmpdir, name + ".pem", p[name + "_content"])
            elif p[name] is not None:
                inputs[name] = p[name]
        cmd = base + ["deploy", target]
        if "bundle" in inputs:
            cmd += ["--cert", inputs["bundle"]]
        else:
            cmd += ["--cert", inputs["cert"], "--key", inputs["key"]]
        if "chain" in inputs:
            cmd += ["--chain", inputs["chain"]]
        if module.check_mode:
            cmd.append("--dry-run")
        if not p["verify"]:
            cmd.append("--no-verify")
        if not p["reload"]:
            cmd.append("--no-reload")
        if not p["wait"]:
            cmd.append("--no-wait")

        before = current_state(module, base, target) if module._diff else None
        rc, out, err = module.run_command(cmd)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    events = parse_events(out)
    result = dict(target=target, rc=rc, outcome="", error="", changed=False)
    done = next((e for e in reversed(events) if "result" in e), None)
    refused = next((e for e in events if "error" in e and "stage" not in e), None)
    validated = next((e for e in events if e.get("stage") == "validated"), None)
    planned = next((e for e in events if e.get("stage") == "planned"), None)
    files = public_files(planned.get("files")) if planned else []
    if events:
        result["stages"] = [
            {"stage": e.get("stage"), "message": e.get("message", "")} for e in events if "stage" in e
        ]
        if events[0].get("deploy_id"):
            result["deploy_id"] = events[0]["deploy_id"]
    if planned:
        result["files"] = files
    if done:
        r = done["result"]
        result.update(
            outcome=r.get("outcome", ""),
            error=r.get("error", ""),
            cert_sha256=r.get("cert_sha256", ""),
            subject=r.get("subject", ""),
            not_after_unix=r.get("not_after_unix", 0),
            not_after=stamp(r.get("not_after_unix", 0)),
            verification=r.get("verification", ""),
            disk_sha256=r.get("disk_sha256", ""),
            served_sha256=r.get("served_sha256", ""),
            warnings_agent=r.get("warnings", []),
            duration_ms=r.get("duration_ms", 0),
        )
    elif refused:
        result["error"] = refused.get("error", "")

    if rc != 0 or not done:
        if done:
            msg = "deploy %s: %s (exit %d): %s" % (target, result["outcome"], rc, result["error"])
        elif result["error"]:
            msg = "deploy %s: exit %d: %s" % (target, rc, result["error"])
        else:
            msg = "deploy %s: certctl exited %d: %s" % (target, rc, (err or out).strip())
        module.fail_json(msg=msg, **result)

    outcome = result["outcome"]
    if outcome == "deployed":
        result["changed"] = True
    elif outcome == "dry_run":
        result["changed"] = any(f["changed"] for f in files)

    if module._diff:
        after_files = [f for f in files if f["changed"]]
        if before is not None:
            before_text = describe(
                before.get("cert_sha256"), before.get("subject"), before.get("not_after_unix"), []
            )
        else:
            before_text = "cert_sha256: (unknown)\n"
        if result["changed"]:
            after_text = describe(
                result["cert_sha256"], result["subject"], result["not_after_unix"], after_files
            )
        else:
            after_text = before_text
        result["diff"] = dict(
            before=before_text,
            after=after_text,
            before_header="%s (on disk)" % target,
            after_header="%s (%s)" % (target, "would deploy" if module.check_mode else "deployed"),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
