# A stdout callback for ansible-playbook that prints one JSON document at
# the end: every play (one per batch with serial), its tasks with start and
# end times, each host's result, and the recap's stats. The shape is that
# of the ansible.posix collection's json callback, which Debian's
# ansible-core does not include. Results arrive censored (no_log), as
# every callback gets them.

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json

from ansible.module_utils.common.json import AnsibleJSONEncoder
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: certctl_test_json
type: stdout
short_description: the whole run as one JSON document
description: Plays, tasks, per-host results and stats, printed at the end.
"""


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "certctl_test_json"

    def __init__(self, display=None):
        super(CallbackModule, self).__init__(display)
        self.plays = []

    def v2_playbook_on_play_start(self, play):
        self.plays.append(
            {"play": {"name": play.get_name(), "duration": {"start": _now()}}, "tasks": []}
        )

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.plays[-1]["tasks"].append(
            {"task": {"name": task.get_name(), "duration": {"start": _now()}}, "hosts": {}}
        )

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def _record(self, result, **extra):
        task = self.plays[-1]["tasks"][-1]
        out = dict(result._result)
        out.update(extra)
        task["hosts"][result._host.get_name()] = out
        task["task"]["duration"]["end"] = _now()

    def v2_runner_on_ok(self, result, **kwargs):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats):
        summary = dict((h, stats.summarize(h)) for h in sorted(stats.processed.keys()))
        self._display.display(
            json.dumps({"plays": self.plays, "stats": summary}, cls=AnsibleJSONEncoder, sort_keys=True)
        )
