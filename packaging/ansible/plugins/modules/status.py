#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: certctl developers
# Apache License 2.0 (see the LICENSE of https://github.com/certctl/certctl)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: status
short_description: Read the state of certctl-agent's targets as facts
description:
  - Runs C(certctl --json status) on the managed host and returns the agent
    and each target's state (the certificate on disk, its expiry, whether
    the served certificate was verified, the last deploy) as the fact
    C(certctl), keyed by target name.
  - Changes nothing; read access to the socket (C(read_groups)) is enough.
version_added: "0.1.0"
author:
  - certctl developers
options:
  targets:
    description: Only these targets (all when empty).
    type: list
    elements: str
    default: []
  socket:
    description: The agent's socket; the CLI's default (C(/run/certctl/agent.sock)) when unset.
    type: path
notes:
  - Supports check mode.
seealso:
  - module: certctl.agent.deploy
"""

EXAMPLES = r"""
- name: Read every target's state
  certctl.agent.status:

- name: Fail when web's certificate expires within 21 days
  ansible.builtin.assert:
    that: certctl.targets.web.not_after_unix - now(utc=true).timestamp() > 21 * 86400
"""

RETURN = r"""
ansible_facts:
  description: Facts set on the host.
  returned: always
  type: complex
  contains:
    certctl:
      description:
        - C(agent) (version, pid, config_path, socket, drop directory
          state, last configuration reload) and C(targets), a dict by target
          name of what C(certctl status --json) says of each (name, kind,
          cert_path, cert_sha256, not_after_unix, not_after, subject,
          disk_state, verification, busy, served, last, last_drop).
      type: dict
      sample:
        agent:
          version: 0.1.0
        targets:
          web:
            cert_sha256: 9f3a12...
            not_after: "2027-02-20T00:00:00Z"
            verification: verified
            last:
              outcome: deployed
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            targets=dict(type="list", elements="str", default=[]),
            socket=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    certctl = module.get_bin_path("certctl", required=True)
    cmd = [certctl, "--json"]
    if module.params["socket"]:
        cmd += ["--socket", module.params["socket"]]
    cmd += ["status"] + module.params["targets"]
    rc, out, err = module.run_command(cmd)
    try:
        doc = json.loads(out)
    except ValueError:
        doc = {}
    if rc != 0:
        module.fail_json(
            msg="certctl status: %s" % (doc.get("error") or err.strip() or "exit %d" % rc),
            rc=rc,
        )
    targets = {}
    for t in doc.get("targets", []):
        unix = t.get("not_after_unix") or 0
        t["not_after"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix)) if unix else ""
        targets[t["name"]] = t
    module.exit_json(
        changed=False,
        rc=rc,
        ansible_facts=dict(certctl=dict(agent=doc.get("agent", {}), targets=targets)),
    )


if __name__ == "__main__":
    main()
