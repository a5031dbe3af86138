# -*- coding: utf-8 -*-
# Copyright: certctl developers
# Apache License 2.0 (see the LICENSE of https://github.com/certctl/certctl)
"""The filter certctl.agent.to_toml: a dict as a TOML document.

Ansible ships no TOML writer and the managed host's python3 may have none
either, so the role renders /etc/certctl/agent.toml with this one: tables
for dicts, arrays of tables for lists of dicts ([[target]] with its
[target.verify]), inline tables for dicts inside arrays (verify endpoints),
and basic strings escaped as TOML wants them. The agent checks the result
(the role's template task runs `certctl-agent check-config` on it).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible.errors import AnsibleFilterError
from ansible.module_utils.six import string_types

DOCUMENTATION = r"""
name: to_toml
short_description: Render a dict as a TOML document
version_added: "0.1.0"
description:
  - Dicts become tables, lists of dicts arrays of tables, other values
    C(key = value) lines. Keys are written bare when they can be, quoted
    otherwise. C(null) values are left out.
positional: _input
options:
  _input:
    description: The document.
    type: dict
    required: true
"""

EXAMPLES = r"""
content: "{{ {'agent': {'read_groups': []}, 'target': [{'name': 'web', 'kind': 'nginx'}]} | certctl.agent.to_toml }}"
"""

RETURN = r"""
_value:
  description: The TOML text, ending with a newline.
  type: str
"""

BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k):
    k = str(k)
    return k if BARE.match(k) else _string(k)


def _string(s):
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04X" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(v, where):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, string_types):
        return _string(v)
    if isinstance(v, dict):
        items = ["%s = %s" % (_key(k), _value(x, where)) for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    raise AnsibleFilterError("to_toml: %s: cannot write a %s" % (where, type(v).__name__))


def _is_tables(v):
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, dict) for x in v)


def _table(doc, path, lines):
    # Plain keys first: they belong to the table just opened.
    for k, v in doc.items():
        if v is None or isinstance(v, dict) or _is_tables(v):
            continue
        lines.append("%s = %s" % (_key(k), _value(v, ".".join(path + [str(k)]))))
    for k, v in doc.items():
        sub = path + [_key(k)]
        if isinstance(v, dict):
            lines.append("")
            lines.append("[%s]" % ".".join(sub))
            _table(v, sub, lines)
        elif _is_tables(v):
            for item in v:
                lines.append("")
                lines.append("[[%s]]" % ".".join(sub))
                _table(item, sub, lines)


def to_toml(doc):
    if not isinstance(doc, dict):
        raise AnsibleFilterError("to_toml: expects a dict, got a %s" % type(doc).__name__)
    lines = []
    _table(doc, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


class FilterModule(object):
    def filters(self):
        return {"to_toml": to_toml}
