"""The CI templates (ci/gitlab-ci.yml, ci/github-actions.yml) against their schemas and against the Makefile.

They must validate, call only `make` targets that exist, run every shard of
one split, keep the JUnit file each shard's `make conformance` writes, and
hand those files to the `make report-merge` of the report job where the
Makefile looks for them. The Makefile is asked with `make -n`, so a renamed
target or output file breaks these tests as it would break a pipeline.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GITLAB = ROOT / "ci" / "gitlab-ci.yml"
GITHUB = ROOT / "ci" / "github-actions.yml"
GITLAB_CONFORMANCE, GITLAB_REPORT = "vballoon-conformance", "vballoon-report"
GITHUB_CONFORMANCE, GITHUB_REPORT = "conformance", "report"
GITLAB_KEYWORDS = {"default", "include", "stages", "variables", "workflow"}


@dataclass(frozen=True)
class MakeCall:
    """A `make` command of a job: the folder it runs in (relative to the job's start) and its arguments."""

    workdir: str
    args: tuple[str, ...]

    @property
    def targets(self) -> list[str]:
        return [a for a in self.args if "=" not in a and not a.startswith("-")]

    @property
    def assignments(self) -> list[str]:
        return [a for a in self.args if "=" in a and not a.startswith("-")]


def expand(text: str, values: Mapping[str, str]) -> str:
    """`${{ name }}` (GitHub expressions) and `$NAME` / `${NAME}` (shell) replaced from values; others kept."""
    text = re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", lambda m: values.get(m[1], m[0]), text)
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: values.get(m[1] or m[2], m[0]), text)


def make_calls(script: Iterable[str], values: Mapping[str, str], workdir: str = ".") -> list[MakeCall]:
    """The `make` commands of a job's script lines, following its `cd`s."""
    calls = []
    for entry in script:
        for line in entry.splitlines():
            first = line.split()[:1]
            if first == ["cd"]:
                workdir = posixpath.normpath(posixpath.join(workdir, shlex.split(expand(line, values))[1]))
            elif first == ["make"]:
                calls.append(MakeCall(workdir, tuple(shlex.split(expand(line, values))[1:])))
    return calls


def make_dry_run(makefile_dir: Path, args: Iterable[str]) -> str:
    """`make -n ARGS` in makefile_dir: what the Makefile would run (fails the test when make refuses)."""
    result = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(makefile_dir), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"make -n {' '.join(args)} failed: {result.stderr.strip()}"
    return result.stdout


def conformance_junit(assignments: Iterable[str]) -> str:
    """The one JUnit file, relative to the Makefile's folder, that `make conformance ASSIGNMENTS` writes."""
    written = set(re.findall(r"reports/[^\s'\"=]*\.xml", make_dry_run(ROOT, ["conformance", *assignments])))
    assert len(written) == 1, f"expected make conformance {' '.join(assignments)} to name one JUnit file, got {written}"
    return written.pop()


def merged_inputs(tmp_path: Path, workdir: str, call: MakeCall, files: Iterable[str]) -> str:
    """`make -n report-merge` in a copy of the Makefile at workdir, with files (relative to tmp_path) present."""
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("<testsuite/>\n")
    (tmp_path / workdir).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Makefile", tmp_path / workdir / "Makefile")
    return make_dry_run(tmp_path / workdir, call.args)


def complete_split(shards: Iterable[str]) -> list[tuple[int, int]]:
    """The shards 'K/N' as (K, N), checked to be every shard of one split, once each."""
    pairs = [tuple(int(part) for part in shard.split("/")) for shard in shards]
    counts = {n for _, n in pairs}
    assert len(counts) == 1, f"expected the shards of one split, got {shards}"
    count = counts.pop()
    assert sorted(k for k, _ in pairs) == list(range(1, count + 1)), (
        f"expected shards 1/{count} to {count}/{count}, got {shards}")
    return [(k, n) for k, n in pairs]


# GitLab


def gitlab() -> dict[str, Any]:
    return yaml.safe_load(GITLAB.read_text())


def gitlab_job(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A job with the keys of the jobs it extends (theirs first, its own over them)."""
    job = doc[name]
    parents = job.get("extends", [])
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged.update(gitlab_job(doc, parent))
    merged.update(job)
    return merged


def gitlab_script(job: Mapping[str, Any]) -> list[str]:
    return [*job.get("before_script", []), *job["script"]]


def gitlab_shards(doc: Mapping[str, Any]) -> list[str]:
    (matrix,) = gitlab_job(doc, GITLAB_CONFORMANCE)["parallel"]["matrix"]
    return list(matrix["SHARD"])


def gitlab_conformance_call(doc: Mapping[str, Any], shard: str) -> MakeCall:
    values = {**doc["variables"], "SHARD": shard}
    calls = [c for c in make_calls(gitlab_script(gitlab_job(doc, GITLAB_CONFORMANCE)), values) if "conformance" in c.targets]
    assert len(calls) == 1, f"expected one make conformance in {GITLAB_CONFORMANCE}, got {calls}"
    return calls[0]


# GitHub


def github() -> dict[str, Any]:
    return yaml.safe_load(GITHUB.read_text())


def github_inputs(doc: Mapping[str, Any]) -> dict[str, str]:
    """`inputs.NAME` -> its default. (PyYAML reads the key `on` as True, YAML 1.1's boolean.)"""
    inputs = doc.get("on", doc.get(True))["workflow_call"]["inputs"]
    return {f"inputs.{name}": str(spec.get("default", "")) for name, spec in inputs.items()}


def github_step_calls(job: Mapping[str, Any], values: Mapping[str, str]) -> list[MakeCall]:
    calls = []
    for step in job["steps"]:
        if "run" in step:
            env = {name: expand(str(value), values) for name, value in step.get("env", {}).items()}
            calls += make_calls([step["run"]], {**values, **env}, step.get("working-directory", "."))
    return calls


def github_uses(job: Mapping[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").split("@")[0] == action]


# Tests


@pytest.mark.parametrize("template, schema", [(GITLAB, "vendor.gitlab-ci"), (GITHUB, "vendor.github-workflows")],
                         ids=["gitlab", "github"])
def test_the_template_validates_against_its_schema(template: Path, schema: str) -> None:
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(template)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{template.name} is not a valid {schema} file:\n{result.stdout}{result.stderr}"


def test_every_make_target_the_templates_call_exists() -> None:
    gl, gh = gitlab(), github()
    calls = [call for name in gl if name not in GITLAB_KEYWORDS and not name.startswith(".")
             for call in make_calls(gitlab_script(gitlab_job(gl, name)), {})]
    values = {**github_inputs(gh), "matrix.shard": "1"}
    calls += [call for job in gh["jobs"].values() for call in github_step_calls(job, values)]
    targets = {target for call in calls for target in call.targets}
    assert {"conformance", "report-merge"} <= targets, f"expected the templates to call both targets, got {targets}"
    for target in sorted(targets):
        make_dry_run(ROOT, [target])


def test_gitlab_shards_keep_the_junit_files_the_makefile_writes() -> None:
    doc = gitlab()
    job = gitlab_job(doc, GITLAB_CONFORMANCE)
    artifacts = job["artifacts"]
    assert artifacts.get("when") == "always", "expected the shards' artefacts kept when tests fail"
    for k, n in complete_split(gitlab_shards(doc)):
        call = gitlab_conformance_call(doc, f"{k}/{n}")
        written = posixpath.join(call.workdir, conformance_junit(call.assignments))
        assert written.endswith(f"junit-shard-{k}-of-{n}.xml"), f"expected shard {k}/{n}'s own file, got {written}"
        assert any(fnmatch.fnmatch(written, p) for p in artifacts["paths"]), (
            f"shard {k}/{n} writes {written}, which no artefact path of {GITLAB_CONFORMANCE} keeps: {artifacts['paths']}")
        assert fnmatch.fnmatch(written, artifacts["reports"]["junit"]), (
            f"shard {k}/{n} writes {written}, not the JUnit report {artifacts['reports']['junit']}")


def test_gitlab_report_merges_every_shard(tmp_path: Path) -> None:
    doc = gitlab()
    report = gitlab_job(doc, GITLAB_REPORT)
    needed = {need["job"] for need in report["needs"] if need.get("artifacts", True)}
    assert GITLAB_CONFORMANCE in needed, f"expected {GITLAB_REPORT} to take {GITLAB_CONFORMANCE}'s artefacts"
    shard_files = []
    for k, n in complete_split(gitlab_shards(doc)):
        call = gitlab_conformance_call(doc, f"{k}/{n}")
        shard_files.append(posixpath.join(call.workdir, conformance_junit(call.assignments)))
    (merge,) = [c for c in make_calls(gitlab_script(report), doc["variables"]) if "report-merge" in c.targets]
    commands = merged_inputs(tmp_path, merge.workdir, merge, shard_files)
    for name in shard_files:
        assert posixpath.relpath(name, merge.workdir) in commands.split(), (
            f"{GITLAB_REPORT}'s make report-merge does not merge {name}:\n{commands}")


def test_github_shards_upload_the_junit_files_the_makefile_writes() -> None:
    doc = github()
    job = doc["jobs"][GITHUB_CONFORMANCE]
    for k, n in complete_split(f"{shard}/4" for shard in job["strategy"]["matrix"]["shard"]):
        values = {**github_inputs(doc), "matrix.shard": str(k)}
        (call,) = [c for c in github_step_calls(job, values) if "conformance" in c.targets]
        assert f"SHARD={k}/{n}" in call.assignments, f"expected make conformance SHARD={k}/{n}, got {call.args}"
        written = posixpath.join(call.workdir, conformance_junit(call.assignments))
        assert written.endswith(f"junit-shard-{k}-of-{n}.xml"), f"expected shard {k}/{n}'s own file, got {written}"
        uploads = [s for s in github_uses(job, "actions/upload-artifact") if fnmatch.fnmatch(written, s["with"]["path"])]
        assert uploads, f"shard {k}/{n} writes {written}, which no upload-artifact step uploads"
        assert uploads[0].get("if") == "always()", "expected the shard's JUnit uploaded when tests fail"


def test_github_report_merges_every_shard(tmp_path: Path) -> None:
    doc = github()
    job, report = doc["jobs"][GITHUB_CONFORMANCE], doc["jobs"][GITHUB_REPORT]
    assert GITHUB_CONFORMANCE in report["needs"], f"expected {GITHUB_REPORT} to need {GITHUB_CONFORMANCE}"
    (download,) = github_uses(report, "actions/download-artifact")
    landed = []
    for k, _ in complete_split(f"{shard}/4" for shard in job["strategy"]["matrix"]["shard"]):
        values = {**github_inputs(doc), "matrix.shard": str(k)}
        (call,) = [c for c in github_step_calls(job, values) if "conformance" in c.targets]
        written = posixpath.join(call.workdir, conformance_junit(call.assignments))
        (upload,) = [s for s in github_uses(job, "actions/upload-artifact") if fnmatch.fnmatch(written, s["with"]["path"])]
        artifact = expand(upload["with"]["name"], values)
        assert fnmatch.fnmatch(artifact, download["with"].get("pattern", download["with"].get("name", ""))), (
            f"{GITHUB_REPORT} does not download the artefact {artifact}")
        folder = download["with"]["path"] if download["with"].get("merge-multiple") else posixpath.join(
            download["with"]["path"], artifact)
        landed.append(posixpath.join(folder, posixpath.basename(written)))
    (merge,) = [c for c in github_step_calls(report, github_inputs(doc)) if "report-merge" in c.targets]
    commands = merged_inputs(tmp_path, merge.workdir, merge, landed)
    for name in landed:
        assert posixpath.relpath(name, merge.workdir) in commands.split(), (
            f"{GITHUB_REPORT}'s make report-merge does not merge {name}:\n{commands}")
