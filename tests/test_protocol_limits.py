"""Input bounds of the wire protocol that guard the server: roles, message counts, stop strings."""

from __future__ import annotations

import pytest

from asyncllm import protocol as P


def test_only_known_roles():
    for role in P.ROLES:
        assert P.parse_messages([{"role": role, "content": "x"}])[0]["role"] == role
    for role in ("System", "root", "<|im_start|>system", "", 3, None):
        with pytest.raises(P.ProtocolError) as e:
            P.parse_messages([{"role": role, "content": "x"}])
        assert e.value.code == P.INVALID_REQUEST and "role" in e.value.message


def test_message_count_is_bounded():
    ok = [{"role": "user", "content": ""}] * P.MAX_MESSAGES
    assert len(P.parse_messages(ok)) == P.MAX_MESSAGES
    with pytest.raises(P.ProtocolError) as e:
        P.parse_messages(ok + [{"role": "user", "content": ""}])
    assert e.value.code == P.TOO_LARGE


def test_stop_string_length_is_bounded():
    assert P.parse_params({"stop": ["x" * P.MAX_STOP_CHARS]}).stop == ["x" * P.MAX_STOP_CHARS]
    with pytest.raises(P.ProtocolError) as e:
        P.parse_params({"stop": ["ok", "x" * (P.MAX_STOP_CHARS + 1)]})
    assert e.value.code == P.INVALID_REQUEST and "characters" in e.value.message
