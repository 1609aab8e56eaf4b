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


def test_summarize_is_tolerant_and_reads_what_a_person_reads():
    mixed = summarize(b"Subject: \xc3\xa9t\xc3\xa9 \xe9\r\nFrom: Gr\xfc\xdfe <A@B.example>\r\n"
                      b"To: =?iso-8859-1?Q?Zo=EB?= <z@x>, \"Doe, J\" <j@x>\r\n\r\nx")
    assert mixed["subject"] == "été é"  # UTF-8 where it is UTF-8, the other 8-bit bytes as cp1252
    assert mixed["from"] == ["a@b.example"] and mixed["names"]["from"] == ["Grüße"]
    assert mixed["to"] == ["z@x", "j@x"] and mixed["names"]["to"] == ["Zoë", "Doe, J"]
    html = summarize(b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
                     b"plain words\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><title>t</title>"
                     b"<style>p{}</style></head><body><p>Hello&nbsp;<b>wor</b>ld</p><p>again</p></body></html>\r\n"
                     b"--b--\r\n")
    assert html["body_text"] == "Hello world again" and html["attachments"] == []
    for junk in (b"", b"garbage", b"Date: nonsense\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
                 b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n"):
        s = summarize(junk)
        assert s["date"] is None and isinstance(s["attachments"], list)
