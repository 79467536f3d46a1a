"""The MLPerf training compliance checker (3.1.0) on a written log, its verdict parsed.

`check_compliance(path)` runs `mlperf_logging.compliance_checker` in a fresh process and returns
a `ComplianceResult`: the verdict, each failing message with the log keys it names, and the
warnings that do not fail a log. `failures_excluding({"eval_accuracy"})` is how tests say "this
log is compliant except that no evaluation reached the target".
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable

DEFAULT_RULESET = "3.1.0"

# The checker joins all its messages into one logging.warning call, separated by this line.
_MESSAGE_SEPARATOR = "\n" + "-" * 30 + "\n"
# Each record of the checker's own log file starts with "LEVEL - " (its formatter).
_RECORD_START = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) - ", re.MULTILINE)
# The one message put_warning writes (a required-once key repeated with the same value): it
# does not fail the check, so it is reported as a warning, not a failure.
_REPEATED_KEY_WARNING = re.compile(
    r"^Required EXACTLY_ONE occurrence of '(\w+)' but found [1-9]\d*$")
# Where the checker's messages name keys.
_KEY_PATTERNS = (
    re.compile(r"CHECK for '(\w+)' failed"),             # a per-line CHECK returned False
    re.compile(r"occurrence of '(\w+)'"),                 # EXACTLY_ONE / AT_LEAST_ONE counts
    re.compile(r" or '(\w+)'"),                           # AT_LEAST_ONE_OR alternatives
    re.compile(r"^Failed checks for (\w+) :", re.MULTILINE),  # ATLEAST_ONE_CHECK: never true
)
_MLLOG_LINE = re.compile(r"^:::MLLOG (\{.*\})$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ComplianceMessage:
    """One message of the checker: its text and the log keys it is about (may be empty)."""

    text: str
    keys: frozenset


@dataclasses.dataclass(frozen=True)
class ComplianceResult:
    """What the checker said about one log.

    Attributes:
        passed: the checker's verdict (its exit code was 0).
        failures: messages that make the log fail, each with the keys it mentions.
        warnings: messages that do not fail the log (a required-once key repeated with one value).
        output: the checker's full log, for error messages.
    """

    passed: bool
    failures: tuple
    warnings: tuple
    output: str

    def failures_excluding(self, keys: Iterable[str]) -> list:
        """The failures that mention none of `keys` (failures naming no key are kept).

        E.g. `failures_excluding({"eval_accuracy"})` is empty for a log that is compliant except
        that no evaluation reached the target.
        """
        keys = frozenset(keys)
        return [failure for failure in self.failures if not failure.keys & keys]

    @property
    def failed_keys(self) -> frozenset:
        """Every key mentioned by some failure."""
        return frozenset().union(*(failure.keys for failure in self.failures))


def _keys_in(message: str) -> frozenset:
    """The log keys a checker message names, from its wording and any MLLOG line it quotes."""
    keys = set()
    for pattern in _KEY_PATTERNS:
        keys.update(pattern.findall(message))
    for line in _MLLOG_LINE.findall(message):
        try:
            keys.add(json.loads(line)["key"])
        except (ValueError, KeyError, TypeError):
            pass
    return frozenset(keys)


def parse_checker_output(output: str, passed: bool) -> ComplianceResult:
    """Splits the checker's log (`LEVEL - message` records) into failures and warnings.

    Args:
        output: the text the checker wrote to its --log_output file.
        passed: the checker's verdict.
    """
    failures, warnings = [], []
    starts = [match.start() for match in _RECORD_START.finditer(output)] + [len(output)]
    for begin, end in zip(starts[:-1], starts[1:]):
        level, _, body = output[begin:end].partition(" - ")
        if level != "WARNING":
            continue  # INFO: progress lines; ERROR: the final "FAILED" verdict.
        for text in body.split(_MESSAGE_SEPARATOR):
            text = text.strip()
            if not text:
                continue
            message = ComplianceMessage(text=text, keys=_keys_in(text))
            if _REPEATED_KEY_WARNING.match(text):
                warnings.append(message)
            else:
                failures.append(message)
    return ComplianceResult(passed=passed, failures=tuple(failures), warnings=tuple(warnings),
                            output=output)


def check_compliance(log_path: str, ruleset: str = DEFAULT_RULESET) -> ComplianceResult:
    """Runs the MLPerf training compliance checker on `log_path` in a fresh Python process.

    The checker keeps module-global state (its queue of rule files), so it runs as
    `python -m mlperf_logging.compliance_checker --usage training --ruleset RULESET LOG`, with its
    own log file in a temporary folder instead of ./compliance_checker.log.

    Raises:
        FileNotFoundError: log_path does not exist.
    """
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f"MLPerf log not found: {log_path}")
    with tempfile.TemporaryDirectory(prefix="mlperf_check_") as tmp:
        checker_log = os.path.join(tmp, "compliance_checker.log")
        command = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage",
                   "training", "--ruleset", ruleset, "--log_output", checker_log, log_path]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if os.path.exists(checker_log):
            with open(checker_log, encoding="utf-8") as f:
                output = f.read()
        else:  # The checker died before logging (bad arguments): keep what it printed.
            output = completed.stdout + completed.stderr
    result = parse_checker_output(output, passed=completed.returncode == 0)
    if not result.passed and not result.failures:
        # A crash or a usage error: no message to parse, so report the raw output as one.
        crash = ComplianceMessage(text=(completed.stdout + completed.stderr).strip() or output,
                                  keys=frozenset())
        result = dataclasses.replace(result, failures=(crash,))
    return result
