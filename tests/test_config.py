"""ServeConfig: flags win over DISCO_* variables, which win over the defaults; derived values."""
from __future__ import annotations

import os
from dataclasses import fields

import pytest

from disco.service.config import _HELP, ServeConfig, available_cores


def test_flags_win_over_environment_over_defaults() -> None:
    assert ServeConfig.from_args([], env={}).max_batch == 64
    assert ServeConfig.from_args([], env={"DISCO_MAX_BATCH": "16"}).max_batch == 16
    assert ServeConfig.from_args(["--max-batch", "8"], env={"DISCO_MAX_BATCH": "16"}).max_batch == 8
    assert ServeConfig.from_args([], env={"DISCO_REUSE_PORT": "yes"}).reuse_port is True


def test_every_field_is_documented() -> None:
    assert {f.name for f in fields(ServeConfig)} == set(_HELP)


def test_worker_threads_default_to_the_usable_cores() -> None:
    assert available_cores() == len(os.sched_getaffinity(0))
    assert ServeConfig.from_args([], env={}).worker_threads() == available_cores()
    assert ServeConfig.from_args(["--workers", "3"], env={}).worker_threads() == 3


def test_bad_values_are_refused_with_the_value() -> None:
    with pytest.raises(SystemExit):
        ServeConfig.from_args(["--io-binding", "maybe"], env={})
    with pytest.raises(SystemExit):
        ServeConfig.from_args(["--tls-cert", "a.pem"], env={})  # without --tls-key
