# -*- coding: utf-8 -*-
# Copyright: certctl developers
# Apache License 2.0 (see the LICENSE of https://github.com/certctl/certctl)
"""Action plugin of certctl.agent.deploy: reads controller-side files.

Unless remote_src is true, cert, key, chain and bundle are paths on the
controller (looked up like the copy module's src: the role's or play's
files/ directory first). They are read here and handed to the module as
cert_content, key_content, chain_content and bundle_content; the module
declares key_content and bundle_content no_log, so the key never shows in
the task's invocation, its result or a callback's output.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

# certctl refuses larger input files; refuse them before they travel.
MAX_INPUT = 1024 * 1024
FILE_OPTIONS = ("cert", "key", "chain", "bundle")


class ActionModule(ActionBase):

    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        if task_vars is None:
            task_vars = dict()
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp

        args = dict(self._task.args)
        if not boolean(args.get("remote_src", False), strict=False):
            for option in FILE_OPTIONS:
                path = args.pop(option, None)
                if path is None:
                    continue
                content = option + "_content"
                if args.get(content) is not None:
                    raise AnsibleActionFail(
                        "deploy: %s and %s are mutually exclusive" % (option, content)
                    )
                args[content] = self._read(option, path)

        result.update(
            self._execute_module(
                module_name="certctl.agent.deploy",
                module_args=args,
                task_vars=task_vars,
            )
        )
        return result

    def _read(self, option, path):
        try:
            found = self._find_needle("files", path)
        except AnsibleError as e:
            raise AnsibleActionFail("deploy: %s %s: %s" % (option, path, to_text(e)))
        try:
            with open(found, "rb") as f:
                data = f.read(MAX_INPUT + 1)
        except (IOError, OSError) as e:
            raise AnsibleActionFail("deploy: cannot read %s %s: %s" % (option, found, to_text(e)))
        if len(data) > MAX_INPUT:
            raise AnsibleActionFail(
                "deploy: %s %s is larger than %d bytes: that is not a certificate or key file"
                % (option, found, MAX_INPUT)
            )
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise AnsibleActionFail("deploy: %s %s is not PEM text" % (option, found))
