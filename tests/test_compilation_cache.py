"""The ``prism`` command's persistent compilation cache: where it goes and what turns it off, and a second
identical run loading its programs from the cache (JAX's own hit/miss events, counted by prism)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import pytest

from prism.framework import compilation_cache
from prism.framework.errors import ConfigError
from tests.conftest import FAST

SUMMARY = re.compile(r"compilation cache: (\d+) programs? loaded \(~\d+ s of compiling saved\), "
                     r"(\d+) compiled and stored \((.*)\)")


def test_enable_respects_the_switch_and_jax_own_setting(tmp_path):
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    try:
        assert compilation_cache.enable({"PRISM_COMPILATION_CACHE": "0", "PRISM_CACHE_DIR": str(tmp_path)}) is None
        with pytest.raises(ConfigError, match="PRISM_COMPILATION_CACHE='maybe': use 1"):
            compilation_cache.enable({"PRISM_COMPILATION_CACHE": "maybe"})
        assert compilation_cache.directory() is None
        assert jax.config.jax_compilation_cache_dir == before[0]
        theirs = str(tmp_path / "theirs")
        assert compilation_cache.enable({"JAX_COMPILATION_CACHE_DIR": theirs}) == tmp_path / "theirs"
        assert jax.config.jax_compilation_cache_dir == before[0]  # JAX applies its own variable itself
        os.environ["PRISM_CACHE_DIR"], saved = str(tmp_path / "prism"), os.environ.get("PRISM_CACHE_DIR")
        environ: dict[str, str] = {}
        try:
            assert compilation_cache.enable(environ) == tmp_path / "prism" / "jax"
        finally:
            os.environ.pop("PRISM_CACHE_DIR") if saved is None else os.environ.update(PRISM_CACHE_DIR=saved)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "prism" / "jax")
        assert jax.config.jax_compilation_cache_max_size == compilation_cache.MAX_BYTES
        # exported for the processes it starts (sweep workers); enabling again is idempotent
        assert environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "prism" / "jax")
        assert environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(compilation_cache.MAX_BYTES)
        assert compilation_cache.enable(environ) == tmp_path / "prism" / "jax"
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])


def test_an_unusable_cache_directory_turns_the_cache_off_with_one_warning(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    before = jax.config.jax_compilation_cache_dir
    os.environ["PRISM_CACHE_DIR"], saved = str(tmp_path / "a_file" / "prism"), os.environ.get("PRISM_CACHE_DIR")
    try:
        with caplog.at_level("WARNING", logger="prism"):
            assert compilation_cache.enable({}) is None
    finally:
        os.environ.pop("PRISM_CACHE_DIR") if saved is None else os.environ.update(PRISM_CACHE_DIR=saved)
    assert jax.config.jax_compilation_cache_dir == before
    assert compilation_cache.directory() is None
    assert "compilation cache off: cannot create" in caplog.text and "PRISM_CACHE_DIR" in caplog.text


def test_a_second_identical_run_loads_its_programs_from_the_cache(tmp_path):
    # the default location: without the test session's JAX_COMPILATION_CACHE_DIR (conftest)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PRISM_CACHE_DIR"] = str(tmp_path / "cache")
    counts = []
    for run in ("first", "second"):
        proc = subprocess.run([sys.executable, "-m", "prism.framework", "train", *FAST,
                               f"hydra.run.dir={tmp_path / run}"], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        match = SUMMARY.search(proc.stdout + proc.stderr)
        assert match, (proc.stdout + proc.stderr)[-2000:]
        assert match.group(3) == str(tmp_path / "cache" / "jax")
        counts.append((int(match.group(1)), int(match.group(2))))
    (first_loaded, first_compiled), (second_loaded, second_compiled) = counts
    # conftest's JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 stores every program: init, train and eval steps, ...
    assert first_loaded == 0 and first_compiled >= 2
    assert second_loaded >= 2 and second_compiled < first_compiled
    assert any((tmp_path / "cache" / "jax").iterdir())
