"""The shared corpora readers (need ``../shared/data``; skipped with the reason without it)."""

from __future__ import annotations

import pytest

from ctxstream.corpora import CorpusError, longchat_conversations, split_texts
from ctxstream.paths import DEFAULT_DATA_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_DATA_DIR / "corpora").is_dir(),
                                reason=f"no shared data at {DEFAULT_DATA_DIR}")


def test_longchat_conversations_alternate_user_and_assistant():
    convs = longchat_conversations()
    assert len(convs) == 30 and all(c.topic for c in convs)
    for c in convs:
        roles = [m["role"] for m in c.messages]
        assert roles[0] == "user" and len(roles) >= 4
        assert all(a != b for a, b in zip(roles, roles[1:])), (c.topic, roles)
        assert all(m["content"] and "USER:" not in m["content"] and "ASSISTANT:" not in m["content"]
                   for m in c.messages)
    # a speaker marker in the middle of a line still starts a new message
    assert [len(c.messages) for c in convs].count(13) >= 1


def test_eval_split_holds_the_conversations_and_missing_data_is_a_typed_error(tmp_path):
    text = split_texts("eval")[1]
    assert longchat_conversations()[0].messages[0]["content"][:40] in text
    with pytest.raises(CorpusError):
        longchat_conversations(tmp_path)
