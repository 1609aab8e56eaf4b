"""The simulator's Graph write API (what restore uses) and the semantic ground truth, over real sockets."""

from __future__ import annotations

from mailpipe.sim.semantic import summarize


# the semantic view ------------------------------------------------------------------------------------------------------

def test_summarize_on_the_seeded_corpus(sim_factory):
    sim = sim_factory(users=1, messages_per_mailbox=150, huge_attachments=True)
    upn = next(u for u in sim.truth(hashes=False)["mailboxes"] if not u.startswith("shared"))
    mb = sim.model.mailbox(upn)
    msgs = sorted(mb.msgs.values(), key=lambda m: m.id)
    seen = {"inline": 0, "attached": 0, "8bit": 0, "nonascii_name": 0, "huge": 0}
    for m in msgs:
        data = mb.mime(m)
        s = summarize(data)
        assert summarize(data) == s  # stable
        assert set(s) == {"subject", "from", "sender", "to", "cc", "bcc", "reply_to", "names", "internet_message_id",
                          "date", "importance", "body_text", "attachments", "attached_messages"}
        assert s["subject"] and s["from"] and s["to"] and s["date"] and s["body_text"]
        assert s["internet_message_id"] == mb.message_json(m, m.id)["internetMessageId"]
        assert s["date"] == m.received.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert s["from"] == [x.lower() for x in s["from"]] and s["sender"] == s["from"]
        seen["inline"] += any(a["is_inline"] and a["content_id"] for a in s["attachments"])
        seen["attached"] += bool(s["attached_messages"])
        seen["8bit"] += any(b > 127 for b in data.split(b"\r\n\r\n", 1)[0])
        seen["nonascii_name"] += any(not n.isascii() for n in s["names"]["from"] + s["names"]["to"])
        seen["huge"] += any(a["size"] > 25 * 1024 * 1024 for a in s["attachments"])
        assert "Kind regards" in s["body_text"]  # the HTML alternative is what a reader sees
    assert all(seen.values()), seen
