"""The simulator's Graph write API (what restore uses) and the semantic ground truth, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import json
import os
import time
from urllib.parse import urlsplit

import httpx
import pytest

from mailpipe.sim import FaultConfig, LimitConfig, SimConfig, start_simulator
from mailpipe.sim.semantic import summarize
from mailpipe_tests.test_sim import delta_all, first_user

H = {"Authorization": "Bearer anything", "Prefer": 'IdType="ImmutableId"'}
FLAGS, RECEIVED, SENT = "Integer 0x0E07", "SystemTime 0x0E06", "SystemTime 0x0039"
MARK = "String {00020329-0000-0000-C000-000000000046} Name MailpipeRestoreId"


def call(method, url, headers=None, **kw):
    return httpx.request(method, url, headers={**H, **(headers or {})}, timeout=60, **kw)


def ea(addr, name=""):
    return {"emailAddress": {"name": name, "address": addr}}


def props(**kw):
    return [{"id": k, "value": v} for k, v in kw.items()]


def received_item(subject="Hello", **extra):
    """A message as a restore posts a received one: PidTagMessageFlags without mfUnsent, both dates."""
    return {"subject": subject, "body": {"contentType": "text", "content": "Some words here."},
            "from": ea("sender@partner.example.org", "Sender"), "toRecipients": [ea("me@x.example.com", "Me")],
            "singleValueExtendedProperties": [{"id": FLAGS, "value": "1"},
                                              {"id": RECEIVED, "value": "2024-03-04T05:06:07Z"},
                                              {"id": SENT, "value": "2024-03-04T05:00:00Z"}], **extra}


def file_att(name, data, ctype="application/octet-stream", **kw):
    return {"@odata.type": "#microsoft.graph.fileAttachment", "name": name, "contentType": ctype,
            "contentBytes": base64.b64encode(data).decode(), **kw}


@pytest.fixture
def sim(sim_factory):
    return sim_factory(users=1, messages_per_mailbox=30)


def base(sim):
    upn, uid = first_user(sim)
    return upn, uid, f"{sim.graph_url}/users/{uid}"


def post_message(g, folder, body):
    r = call("POST", f"{g}/mailFolders/{folder}/messages", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def upload(url, data, piece=4 * 1024 * 1024, headers=None):
    """PUT ``data`` to an upload URL in pieces; returns the responses."""
    out = []
    for a in range(0, len(data), piece):
        b = min(len(data), a + piece) - 1
        out.append(httpx.put(url, content=data[a:b + 1], timeout=60,
                             headers={"Content-Range": f"bytes {a}-{b}/{len(data)}", **(headers or {})}))
    return out


# folders ---------------------------------------------------------------------------------------------------------

def test_create_folder_409_and_sync(sim):
    upn, uid, g = base(sim)
    mb = sim.model.mailbox(upn)
    link = call("GET", f"{g}/mailFolders/delta()").json()["@odata.deltaLink"]
    r = call("POST", f"{g}/mailFolders", json={"displayName": "Restore ✓ 2026"})
    assert r.status_code == 201, r.text
    top = r.json()
    assert top["displayName"] == "Restore ✓ 2026" and top["parentFolderId"] == mb.root_id
    assert top["childFolderCount"] == 0 and top["totalItemCount"] == 0 and top["id"]
    r = call("POST", f"{g}/mailFolders/{top['id']}/childFolders", json={"displayName": "Inbox"})
    assert r.status_code == 201
    child = r.json()
    assert child["parentFolderId"] == top["id"]
    # a sibling with the same name, whatever its case: 409; the same name elsewhere is fine
    for parent, name in ((None, "restore ✓ 2026"), (top["id"], "INBOX"), (None, "inbox")):
        url = f"{g}/mailFolders" if parent is None else f"{g}/mailFolders/{parent}/childFolders"
        r = call("POST", url, json={"displayName": name})
        assert r.status_code == 409 and r.json()["error"]["code"] == "ErrorFolderExists", (name, r.text)
    assert call("POST", f"{g}/mailFolders", json={"displayName": ""}).status_code == 400
    assert call("POST", f"{g}/mailFolders", json={"displayName": "x", "colour": 1}).status_code == 400
    assert call("POST", f"{g}/mailFolders/nope/childFolders", json={"displayName": "x"}).status_code == 404
    # listed, in the folder delta, and syncable like any folder
    names = {f["displayName"] for f in call("GET", f"{g}/mailFolders?$top=100").json()["value"]}
    assert "Restore ✓ 2026" in names
    kids = call("GET", f"{g}/mailFolders/{top['id']}/childFolders").json()["value"]
    assert [k["id"] for k in kids] == [child["id"]]
    changed = {f["id"] for f in call("GET", link).json()["value"]}
    assert changed == {top["id"], child["id"]}
    ups, rem, dlink, _ = delta_all(sim, uid, child["id"])
    assert ups == {} and rem == []
    m = post_message(g, child["id"], received_item())
    ups, _, _, _ = delta_all(sim, uid, child["id"], dlink)
    assert set(ups) == {m["id"]}
    assert call("GET", f"{g}/mailFolders/{top['id']}").json()["childFolderCount"] == 1
    st = sim.stats()
    assert st["created_folders"][upn] == 2 and st["requests"][upn]["create_folder"] == 8
    assert [f["path"] for f in sim.truth(upn, hashes=False)["mailboxes"][upn]["folders"]
            if f["id"] == child["id"]] == [["Restore ✓ 2026", "Inbox"]]


# messages ---------------------------------------------------------------------------------------------------------

def test_message_flags_decide_draft_read_and_dates(sim):
    upn, uid, g = base(sim)
    mb = sim.model.mailbox(upn)
    t0 = time.time()
    rec = post_message(g, "inbox", received_item())
    assert rec["isDraft"] is False and rec["isRead"] is True
    assert rec["receivedDateTime"] == "2024-03-04T05:06:07Z" and rec["sentDateTime"] == "2024-03-04T05:00:00Z"
    assert rec["parentFolderId"] == mb.folder_id("inbox") and rec["changeKey"] and rec["internetMessageId"]
    assert rec["subject"] == "Hello" and rec["from"]["emailAddress"]["address"] == "sender@partner.example.org"
    assert rec["hasAttachments"] is False and rec["body"] == {"contentType": "text", "content": "Some words here."}
    created = time.mktime(time.strptime(rec["createdDateTime"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(created - t0) < 5
    unread = post_message(g, "inbox", received_item(singleValueExtendedProperties=props(**{FLAGS: "4"})))
    assert unread["isDraft"] is False and unread["isRead"] is False
    assert abs(time.mktime(time.strptime(unread["receivedDateTime"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone - t0) < 5
    read_by_json = post_message(g, "inbox", received_item(isRead=True,
                                                          singleValueExtendedProperties=props(**{FLAGS: "0"})))
    assert read_by_json["isDraft"] is False and read_by_json["isRead"] is True
    unsent = post_message(g, "inbox", received_item(singleValueExtendedProperties=props(**{FLAGS: "9"})))
    assert unsent["isDraft"] is True
    draft = call("POST", f"{g}/messages", json={"subject": "A draft", "bccRecipients": [ea("hidden@x.org")]})
    assert draft.status_code == 201
    draft = draft.json()
    assert draft["isDraft"] is True and draft["isRead"] is True and draft["parentFolderId"] == mb.folder_id("drafts")
    assert draft["from"]["emailAddress"]["address"] == upn  # the mailbox owner
    # the created items: in the next delta of their folder, GET, truth, and their MIME
    ups, _, _, _ = delta_all(sim, uid, "inbox")
    assert {rec["id"], unread["id"], read_by_json["id"], unsent["id"]} <= set(ups)
    assert ups[rec["id"]]["isDraft"] is False
    got = call("GET", f"{g}/messages/{rec['id']}").json()
    assert got["id"] == rec["id"] and got["receivedDateTime"] == rec["receivedDateTime"]
    truth = {i["id"]: i for i in sim.truth(upn)["mailboxes"][upn]["items"]}
    assert truth[rec["id"]]["is_draft"] is False and truth[draft["id"]]["is_draft"] is True
    assert truth[rec["id"]]["internet_message_id"] == rec["internetMessageId"]
    v1 = call("GET", f"{g}/messages/{rec['id']}/$value").content
    assert v1 == call("GET", f"{g}/messages/{rec['id']}/$value").content  # the same bytes every time
    assert hashlib.sha256(v1).hexdigest() == truth[rec["id"]]["sha256"]
    msg = email.message_from_bytes(v1, policy=email.policy.default)
    assert msg["Date"] == "Mon, 04 Mar 2024 05:00:00 +0000" and msg["Message-ID"] == rec["internetMessageId"]
    assert msg.get_content_type() == "text/plain" and "Bcc" not in msg
    dv = email.message_from_bytes(call("GET", f"{g}/messages/{draft['id']}/$value").content,
                                  policy=email.policy.default)
    assert dv["Bcc"] == "hidden@x.org"  # a draft's Bcc is in its MIME
    st = sim.stats()
    assert st["created_messages"][upn] == 5 and st["requests"][upn]["create_message"] == 5


def test_bad_message_bodies_are_refused(sim):
    upn, uid, g = base(sim)
    bad = [({"subjekt": "x"}, "RequestBodyRead"), ({"importance": "urgent"}, "ErrorInvalidRequest"),
           ({"toRecipients": [{"address": "a@b"}]}, "ErrorInvalidRecipients"),
           ({"singleValueExtendedProperties": [{"id": "Integer 0x0E07", "value": 1}]},
            "ErrorInvalidExtendedPropertyValue"),
           ({"singleValueExtendedProperties": [{"id": "SystemTime 0x0E06", "value": "yesterday"}]},
            "ErrorInvalidExtendedPropertyValue"),
           ({"singleValueExtendedProperties": [{"id": "Wrong 0x0E07", "value": "1"}]}, "ErrorInvalidProperty"),
           ({"internetMessageHeaders": [{"name": "Subject", "value": "x"}]}, "InvalidInternetMessageHeader"),
           ({"attachments": [{"name": "x", "contentBytes": "AAAA"}]}, "RequestBodyRead")]
    for body, code in bad:
        r = call("POST", f"{g}/mailFolders/inbox/messages", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
    r = call("POST", f"{g}/mailFolders/inbox/messages", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = call("POST", f"{g}/mailFolders/inbox/messages", content=base64.b64encode(b"Subject: x\r\n\r\nbody"),
             headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "MIME" in r.json()["error"]["message"]  # not simulated: JSON only
    # read-only properties are ignored, as Exchange ignores them: isDraft is PidTagMessageFlags' business
    r = call("POST", f"{g}/mailFolders/inbox/messages", json={"subject": "x", "isDraft": False,
                                                              "receivedDateTime": "2020-01-01T00:00:00Z"})
    assert r.status_code == 201 and r.json()["isDraft"] is True and not r.json()["receivedDateTime"].startswith("2020")
    # a body over 4 MB: 413 (attachments over 3 MB go through an upload session)
    big = received_item(attachments=[file_att("big.bin", os.urandom(3_200_000))])
    r = call("POST", f"{g}/mailFolders/inbox/messages", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "RequestEntityTooLarge"
    m = post_message(g, "inbox", received_item())
    r = call("POST", f"{g}/messages/{m['id']}/attachments", json=file_att("big.bin", os.urandom(3_200_000)))
    assert r.status_code == 413
    assert sim.stats()["created_messages"][upn] == 2


def test_summarize_of_a_posted_message_is_what_was_posted(sim):
    upn, uid, g = base(sim)
    png, pdf, big = os.urandom(3000), os.urandom(100_000), os.urandom(5_000_000)
    body = {
        "subject": "Überweisung — 領収書 re: café ✓",
        "body": {"contentType": "html", "content": "<html><head><style>p{color:red}</style></head><body>"
                 "<p>Dear Zoë,</p><p>the <b>numbers</b>&nbsp;are attached.<br>Regards</p>"
                 "<img src=\"cid:logo@x\"></body></html>"},
        "from": ea("boss@partner.example.org", "Dupré, Françoise"),
        "sender": ea("assistant@partner.example.org", "Assistant"),
        "toRecipients": [ea("a@x.example.com", "A Person"), ea("B@X.example.com")],
        "ccRecipients": [ea("c@x.example.com", "Ĉ Cé")], "bccRecipients": [ea("d@x.example.com")],
        "replyTo": [ea("reply@partner.example.org", "Replies")], "importance": "high",
        "internetMessageId": "<original-1@partner.example.org>", "categories": ["Red category"],
        "flag": {"flagStatus": "flagged"},
        "singleValueExtendedProperties": props(**{FLAGS: "1", RECEIVED: "2025-01-02T03:04:05Z",
                                                  SENT: "2025-01-02T03:00:00Z", MARK: "r-1"}),
        "attachments": [file_att("logo.png", png, "image/png", isInline=True, contentId="logo@x")],
    }
    m = post_message(g, "sentitems", body)
    assert m["hasAttachments"] is False  # inline attachments do not count
    r = call("POST", f"{g}/mailFolders/sentitems/messages/{m['id']}/attachments", json=file_att("Bericht ü.pdf", pdf,
                                                                                               "application/pdf"))
    assert r.status_code == 201, r.text
    att = r.json()
    assert att["name"] == "Bericht ü.pdf" and att["size"] == len(pdf) and att["isInline"] is False and att["id"]
    assert base64.b64decode(att["contentBytes"]) == pdf
    inner = {"@odata.type": "#microsoft.graph.message", "subject": "The forwarded one",
             "body": {"contentType": "text", "content": "Inner words."},
             "from": ea("someone@partner.example.org"), "toRecipients": [ea("a@x.example.com")],
             "internetMessageId": "<inner@partner.example.org>",
             "singleValueExtendedProperties": props(**{FLAGS: "1", SENT: "2024-12-24T18:00:00Z"})}
    r = call("POST", f"{g}/messages/{m['id']}/attachments",
             json={"@odata.type": "#microsoft.graph.itemAttachment", "name": "The forwarded one", "item": inner})
    assert r.status_code == 201, r.text
    s = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
             json={"AttachmentItem": {"attachmentType": "file", "name": "video.mp4", "size": len(big),
                                      "contentType": "video/mp4"}})
    assert s.status_code == 201, s.text
    rs = upload(s.json()["uploadUrl"], big)
    assert [x.status_code for x in rs] == [200, 201]
    after = call("GET", f"{g}/messages/{m['id']}").json()
    assert after["hasAttachments"] is True and after["changeKey"] != m["changeKey"]
    mime = call("GET", f"{g}/messages/{m['id']}/$value").content
    sm = summarize(mime)
    assert sm["subject"] == body["subject"]
    assert sm["from"] == ["boss@partner.example.org"] and sm["sender"] == ["assistant@partner.example.org"]
    assert sm["to"] == ["a@x.example.com", "b@x.example.com"] and sm["cc"] == ["c@x.example.com"]
    assert sm["bcc"] == ["d@x.example.com"]  # a sent item keeps its Bcc recipients
    assert sm["reply_to"] == ["reply@partner.example.org"]
    assert sm["names"]["from"] == ["Dupré, Françoise"] and sm["names"]["cc"] == ["Ĉ Cé"]
    assert sm["internet_message_id"] == "<original-1@partner.example.org>"
    assert sm["date"] == "2025-01-02T03:00:00Z" and sm["importance"] == "high"
    assert sm["body_text"] == "Dear Zoë, the numbers are attached. Regards"

    def desc(name, data, ctype, inline=False, cid=None):
        return {"name": name, "content_type": ctype, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "is_inline": inline, "content_id": cid}

    assert sm["attachments"] == sorted([desc("logo.png", png, "image/png", True, "logo@x"),
                                        desc("Bericht ü.pdf", pdf, "application/pdf"),
                                        desc("video.mp4", big, "video/mp4")], key=lambda a: a["name"])
    [im] = sm["attached_messages"]
    assert im["subject"] == "The forwarded one" and im["body_text"] == "Inner words."
    assert im["from"] == ["someone@partner.example.org"] and im["date"] == "2024-12-24T18:00:00Z"
    assert im["internet_message_id"] == "<inner@partner.example.org>"
    # Exchange's structure: the inline image with the HTML in multipart/related, inside multipart/mixed
    parsed = email.message_from_bytes(mime, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/mixed"
    kinds = [p.get_content_type() for p in parsed.walk()]
    assert kinds[:4] == ["multipart/mixed", "multipart/related", "text/html", "image/png"] and "message/rfc822" in kinds
    # GET of the attachments answers what was attached (the item: its own MIME)
    atts = call("GET", f"{g}/messages/{m['id']}/attachments").json()["value"]
    assert [a["name"] for a in atts] == ["logo.png", "Bericht ü.pdf", "The forwarded one", "video.mp4"]
    raw = call("GET", f"{g}/messages/{m['id']}/attachments/{atts[3]['id']}/$value").content
    assert raw == big
    # the semantic truth: the same summary plus the item's state
    item = next(i for i in sim.truth(upn, semantic=True)["mailboxes"][upn]["items"] if i["id"] == m["id"])
    sem = item["semantic"]
    assert {k: v for k, v in sem.items() if k in sm} == sm
    assert sem["is_read"] is True and sem["is_draft"] is False and sem["flag_status"] == "flagged"
    assert sem["categories"] == ["Red category"] and sem["received_at"] == "2025-01-02T03:04:05Z"
    assert sem["sent_at"] == "2025-01-02T03:00:00Z"
    assert json.loads(json.dumps(sem)) == sem  # JSON as is
    st = sim.stats()
    assert st["attachments_added"][upn] == 4 and st["requests"][upn]["add_attachment"] == 2


# upload sessions ----------------------------------------------------------------------------------------------------

def test_upload_session_protocol(sim):
    upn, uid, g = base(sim)
    m = post_message(g, "inbox", received_item())
    data = os.urandom(9 * 1024 * 1024 + 17)

    def session(size=len(data), **kw):
        r = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
                 json={"AttachmentItem": {"attachmentType": "file", "name": "data.bin", "size": size, **kw}})
        return r

    r = session(size=2_000_000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize"
    r = session()
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["nextExpectedRanges"] == ["0-"] and s["expirationDateTime"].endswith("Z")
    url = s["uploadUrl"]
    sid = url.split("AttachmentSessions('")[1].split("'")[0]
    up, gr = urlsplit(url), urlsplit(sim.graph_url)
    assert up.hostname == "127.0.0.1" and up.port != gr.port and "authtoken=" in up.query  # another origin
    assert url.startswith(sim.upload_base_url)

    def put(a, b, body=None, headers=None):
        return httpx.put(url, content=data[a:b + 1] if body is None else body, timeout=60,
                         headers={"Content-Range": f"bytes {a}-{b}/{len(data)}", **(headers or {})})

    step = 4 * 1024 * 1024
    r = put(0, step - 1, headers={"Authorization": "Bearer graph-token"})  # our Graph token must not go there
    assert r.status_code == 401
    assert httpx.put(url.replace("authtoken=", "authtoken=x"), content=b"x", timeout=10,
                     headers={"Content-Range": f"bytes 0-0/{len(data)}"}).status_code == 401
    # the upload URL is not a Graph route: the Graph origin does not know it
    assert httpx.put(sim.base_url + up.path + "?" + up.query, content=b"x", timeout=10).status_code == 404
    r = put(0, step - 1)
    assert r.status_code == 200 and r.json()["nextExpectedRanges"] == [str(step)]
    assert r.json()["ExpirationDateTime"] == s["expirationDateTime"]  # as Outlook answers (and does not extend)
    r = put(0, step - 1)  # a repeat (say after a lost answer): accepted again, nothing changes
    assert r.status_code == 200 and r.json()["nextExpectedRanges"] == [str(step)]
    r = put(step + 10, 2 * step - 1)  # a gap
    assert r.status_code == 416
    r = put(step, 2 * step)  # a piece over 4 MB
    assert r.status_code == 413
    r = put(step, step + 9, body=b"short")  # body and range disagree
    assert r.status_code == 400
    r = put(step - 100, 2 * step - 101)  # overlapping what was received: the new part is taken
    assert r.status_code == 200 and r.json()["nextExpectedRanges"] == [str(2 * step - 100)]
    r = put(2 * step - 100, len(data) - 1 - 1024 * 1024)
    assert r.status_code == 200
    r = put(len(data) - 1024 * 1024, len(data) - 1)
    assert r.status_code == 201 and r.content == b""
    loc = r.headers["Location"]
    assert loc.startswith(sim.upload_base_url) and "/Attachments('" in loc
    aid = loc.split("/Attachments('")[1].split("'")[0]
    meta = call("GET", f"{g}/messages/{m['id']}/attachments/{aid}").json()
    assert meta["name"] == "data.bin" and meta["size"] == len(data)
    assert call("GET", f"{g}/messages/{m['id']}/attachments/{aid}/$value").content == data
    assert put(0, 9).status_code == 404  # the session is over
    st = sim.stats()
    ranges = st["upload_ranges"][upn][sid]
    assert ranges[0] == ranges[1] == [0, step - 1]  # the repeat is visible...
    assert st["upload_sessions"][upn][sid]["state"] == "done"
    assert st["upload_with_bearer"][upn] == 1 and st["upload_puts"][upn] == 8
    assert st["requests"][upn]["upload"] == 8 and st["requests"][upn]["upload_session"] == 2
    # cancel: DELETE on the upload URL
    s2 = session().json()
    assert httpx.delete(s2["uploadUrl"], timeout=10).status_code == 204
    assert upload(s2["uploadUrl"], data[:10])[0].status_code == 404
    # a session expires
    sim.set_limits(LimitConfig(upload_session_seconds=0.5))
    s3 = session().json()
    time.sleep(0.7)
    assert upload(s3["uploadUrl"], data)[0].status_code == 404
    st = sim.stats()["upload_sessions"][upn]
    assert sorted(v["state"] for v in st.values()) == ["cancelled", "done", "expired"]


def test_upload_ranges_prove_each_byte_was_sent_once(sim):
    """What a restore test checks: the pieces of an upload are disjoint and cover the file."""
    upn, uid, g = base(sim)
    m = post_message(g, "inbox", received_item())
    _, _, link, _ = delta_all(sim, uid, "inbox")
    data = os.urandom(5_000_000)
    s = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
             json={"AttachmentItem": {"attachmentType": "file", "name": "x", "size": len(data)}}).json()
    assert [r.status_code for r in upload(s["uploadUrl"], data)] == [200, 201]
    [ranges] = sim.stats()["upload_ranges"][upn].values()
    covered = sorted(ranges)
    assert covered[0][0] == 0 and covered[-1][1] == len(data) - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(covered, covered[1:]))
    # the item changed: it is in the next delta, with its attachment
    ups, _, _, _ = delta_all(sim, uid, "inbox", link)
    assert set(ups) == {m["id"]} and ups[m["id"]]["hasAttachments"] is True
    assert ups[m["id"]]["changeKey"] != m["changeKey"]
    assert [a["size"] for a in summarize(call("GET", f"{g}/messages/{m['id']}/$value").content)["attachments"]] == \
        [len(data)]


# lookups ------------------------------------------------------------------------------------------------------------

def test_collision_lookups_by_internet_message_id_and_extended_property(sim):
    upn, uid, g = base(sim)
    mb = sim.model.mailbox(upn)
    odd = "<o'brien+1@x.org>"
    a = post_message(g, "inbox", received_item(internetMessageId=odd, singleValueExtendedProperties=props(
        **{FLAGS: "1", MARK: "it's-1"})))
    b = post_message(g, "archive", received_item(singleValueExtendedProperties=props(**{FLAGS: "1", MARK: "b-2"})))

    def lookup(url, flt, **params):
        r = call("GET", url, params={"$filter": flt, **params})
        assert r.status_code == 200, r.text
        return r.json()["value"]

    q = odd.replace("'", "''")
    got = lookup(f"{g}/mailFolders/inbox/messages", f"internetMessageId eq '{q}'", **{"$select": "id,subject",
                                                                                       "$top": "5"})
    assert [x["id"] for x in got] == [a["id"]] and set(got[0]) <= {"id", "subject", "@odata.etag"}
    assert lookup(f"{g}/mailFolders/archive/messages", f"internetMessageId eq '{q}'") == []
    assert [x["id"] for x in lookup(f"{g}/messages", f"internetMessageId eq '{q}'")] == [a["id"]]
    pf = ("singleValueExtendedProperties/Any(ep: ep/id eq '{}' and ep/value eq '{}')")
    assert [x["id"] for x in lookup(f"{g}/messages", pf.format(MARK, "it''s-1"))] == [a["id"]]
    # the id in another spelling (case of the GUID and type, leading zeros) is the same property
    other = "string {00020329-0000-0000-c000-000000000046} Name MailpipeRestoreId"
    assert [x["id"] for x in lookup(f"{g}/mailFolders/archive/messages", pf.format(other, "b-2"))] == [b["id"]]
    assert lookup(f"{g}/mailFolders/inbox/messages", pf.format(MARK, "b-2")) == []
    # computed properties: PidTagMessageFlags of every item, seeded ones included
    unread_seeded = sum(1 for m in mb.msgs.values() if m.folder == mb.folder_id("inbox") and not m.is_read
                        and m.posted is None)
    got = lookup(f"{g}/mailFolders/inbox/messages", pf.format(FLAGS, "0"), **{"$top": "999"})
    assert len(got) == unread_seeded
    # a seeded item by its internetMessageId
    seeded = next(m for m in mb.msgs.values() if m.posted is None)
    imid = mb.internet_message_id(seeded)
    assert [x["id"] for x in lookup(f"{g}/messages", f"internetMessageId eq '{imid}'")] == [seeded.id]
    # $expand the property on GET and on a listing; absent when not set
    ex = f"singleValueExtendedProperties($filter=id eq '{MARK}')"
    one = call("GET", f"{g}/messages/{a['id']}", params={"$expand": ex}).json()
    assert one["singleValueExtendedProperties"] == [{"id": "String {00020329-0000-0000-c000-000000000046} Name "
                                                           "MailpipeRestoreId", "value": "it's-1"}]
    plain = call("GET", f"{g}/messages/{seeded.id}", params={"$expand": ex}).json()
    assert "singleValueExtendedProperties" not in plain
    lst = lookup(f"{g}/mailFolders/inbox/messages", f"internetMessageId eq '{q}'",
                 **{"$expand": f"singleValueExtendedProperties($filter=id eq '{FLAGS}' or id eq '{RECEIVED}')"})
    assert lst[0]["singleValueExtendedProperties"] == [{"id": "Integer 0xe07", "value": "1"},
                                                       {"id": "SystemTime 0xe06", "value": a["receivedDateTime"]}]
    # unsupported forms are refused, not ignored
    for flt in ("internetMessageId eq", "from/emailAddress/address eq 'x'", "internetMessageId eq 'a' xor 1"):
        assert call("GET", f"{g}/messages", params={"$filter": flt}).status_code == 400
    assert call("GET", f"{g}/messages/{a['id']}", params={"$expand": "attachments"}).status_code == 400
    assert sim.stats()["requests"][upn]["lookup"] >= 8


# PATCH and DELETE ---------------------------------------------------------------------------------------------------

def test_patch_and_the_sent_item_rule(sim):
    upn, uid, g = base(sim)
    m = post_message(g, "inbox", received_item())
    _, _, link, _ = delta_all(sim, uid, "inbox")
    r = call("PATCH", f"{g}/messages/{m['id']}", json={"isRead": False, "flag": {"flagStatus": "complete"},
                                                      "categories": ["Blue category", "Work"], "importance": "low"})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["isRead"] is False and p["flag"]["flagStatus"] == "complete" and p["importance"] == "low"
    assert p["categories"] == ["Blue category", "Work"] and p["changeKey"] != m["changeKey"]
    ups, _, link, _ = delta_all(sim, uid, "inbox", link)
    assert set(ups) == {m["id"]} and ups[m["id"]]["isRead"] is False
    assert summarize(call("GET", f"{g}/messages/{m['id']}/$value").content)["importance"] == "low"
    for field in ({"subject": "changed"}, {"body": {"contentType": "text", "content": "x"}},
                  {"internetMessageId": "<new@x>"}):
        r = call("PATCH", f"{g}/messages/{m['id']}", json=field)
        assert r.status_code == 400 and r.json()["error"]["code"] == "ErrorInvalidPropertyUpdateSentMessage"
    # a draft's content can change
    d = call("POST", f"{g}/messages", json={"subject": "draft", "body": {"contentType": "text", "content": "v1"}}).json()
    r = call("PATCH", f"{g}/messages/{d['id']}", json={"subject": "draft v2",
                                                      "body": {"contentType": "html", "content": "<p>v2</p>"}})
    assert r.status_code == 200 and r.json()["subject"] == "draft v2"
    s = summarize(call("GET", f"{g}/messages/{d['id']}/$value").content)
    assert s["subject"] == "draft v2" and s["body_text"] == "v2"
    # a seeded item's read state and flag
    mb = sim.model.mailbox(upn)
    seeded = next(x for x in mb.msgs.values() if x.posted is None and not x.is_read)
    r = call("PATCH", f"{g}/messages/{seeded.id}", json={"isRead": True})
    assert r.status_code == 200 and r.json()["isRead"] is True and mb.msgs[seeded.id].is_read
    assert call("PATCH", f"{g}/messages/{m['id']}", json={"isRead": "yes"}).status_code == 400
    assert call("PATCH", f"{g}/messages/nope", json={"isRead": True}).status_code == 404
    assert sim.stats()["updated_messages"][upn] == 3


def test_delete_reports_removed_and_value_404(sim):
    upn, uid, g = base(sim)
    a = post_message(g, "inbox", received_item())
    b = post_message(g, "inbox", received_item())
    _, _, link, _ = delta_all(sim, uid, "inbox")
    assert call("DELETE", f"{g}/messages/{a['id']}").status_code == 204
    assert call("POST", f"{g}/mailFolders/inbox/messages/{b['id']}/permanentDelete").status_code == 204
    ups, rem, _, _ = delta_all(sim, uid, "inbox", link)
    assert ups == {} and set(rem) == {a["id"], b["id"]}
    for mid in (a["id"], b["id"]):
        r = call("GET", f"{g}/messages/{mid}/$value")
        assert r.status_code == 404 and r.json()["error"]["code"] == "ErrorItemNotFound"
        assert call("GET", f"{g}/messages/{mid}").status_code == 404
    assert call("DELETE", f"{g}/messages/{a['id']}").status_code == 404
    st = sim.stats()
    assert st["deleted_messages"][upn] == 2 and st["requests"][upn]["delete_message"] == 3


# limits -------------------------------------------------------------------------------------------------------------

def test_upload_budget_429_with_retry_after_then_success(sim_factory):
    sim = sim_factory(users=1, messages_per_mailbox=5,
                      limits=LimitConfig(upload_bytes=1_000_000, upload_window_seconds=3))
    upn, uid, g = base(sim)
    m = post_message(g, "inbox", received_item())
    chunk = os.urandom(300_000)  # ~400 KB of JSON each
    codes = [call("POST", f"{g}/messages/{m['id']}/attachments", json=file_att(f"{i}.bin", chunk)).status_code
             for i in range(2)]
    assert codes == [201, 201]
    t0 = time.monotonic()
    r = call("POST", f"{g}/messages/{m['id']}/attachments", json=file_att("2.bin", chunk))
    assert r.status_code == 429 and r.json()["error"]["code"] == "ApplicationThrottled"
    assert "MailboxUploadLimit" in r.json()["error"]["message"]
    wait = int(r.headers["Retry-After"])
    assert 1 <= wait <= 3
    st = sim.stats()
    assert st["upload_throttled"][upn] == 1 and st["throttled"][upn] == 1
    assert st["attachments_added"][upn] == 2
    # upload-URL PUTs count too
    time.sleep(max(0.0, wait - (time.monotonic() - t0)) + 0.1)
    r = call("POST", f"{g}/messages/{m['id']}/attachments", json=file_att("2.bin", chunk))
    assert r.status_code == 201
    sim.set_limits(LimitConfig(upload_bytes=4_500_000, upload_window_seconds=3))  # ~400 KB used already
    s = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
             json={"AttachmentItem": {"attachmentType": "file", "name": "x", "size": 4_500_000}}).json()
    rs = upload(s["uploadUrl"], os.urandom(4_500_000), piece=2_000_000)
    assert [x.status_code for x in rs][:2] == [200, 200] and rs[2].status_code == 429
    assert int(rs[2].headers["Retry-After"]) >= 1
    st = sim.stats()
    assert st["upload_throttled"][upn] == 2 and st["uploaded_bytes"][upn] > 5_000_000


async def _concurrent_posts(url, n, body):
    async with httpx.AsyncClient(headers=H, timeout=30) as c:
        return await asyncio.gather(*(c.post(url, json=body) for _ in range(n)))


def test_write_routes_obey_concurrency_window_and_faults(sim_factory):
    sim = sim_factory(users=1, messages_per_mailbox=5, faults=FaultConfig(latency_ms=300))
    upn, uid, g = base(sim)
    rs = asyncio.run(_concurrent_posts(f"{g}/mailFolders/inbox/messages", 6, received_item()))
    assert sorted(r.status_code for r in rs) == [201] * 4 + [429] * 2
    sim.set_faults(FaultConfig(p_503=1.0))
    r = call("POST", f"{g}/mailFolders/inbox/messages", json=received_item())
    assert r.status_code == 503
    sim.set_faults(FaultConfig())
    assert sim.stats()["created_messages"][upn] == 4
    sim.set_limits(LimitConfig(window_requests=1, window_seconds=30))
    time.sleep(0.01)
    codes = [call("POST", f"{g}/mailFolders", json={"displayName": f"f{i}"}).status_code for i in range(2)]
    assert 429 in codes


# persistence ----------------------------------------------------------------------------------------------------------

def test_written_items_survive_a_restart(tmp_path):
    cfg = dict(users=1, messages_per_mailbox=20, state_dir=str(tmp_path))
    with start_simulator(SimConfig(**cfg)) as sim:
        upn, uid, g = base(sim)
        f = call("POST", f"{g}/mailFolders", json={"displayName": "Restored"}).json()
        m = post_message(g, f["id"], received_item(attachments=[file_att("a.txt", b"hello\r\n", "text/plain")],
                                                   singleValueExtendedProperties=props(**{FLAGS: "1", MARK: "k1"})))
        s = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
                 json={"AttachmentItem": {"attachmentType": "file", "name": "big", "size": 3_500_000}}).json()
        assert upload(s["uploadUrl"], os.urandom(3_500_000))[-1].status_code == 201
        call("PATCH", f"{g}/messages/{m['id']}", json={"flag": {"flagStatus": "flagged"}})
        gone = post_message(g, "inbox", received_item())
        call("DELETE", f"{g}/messages/{gone['id']}")
        _, _, link, _ = delta_all(sim, uid, f["id"])
        before = sim.truth(semantic=True)
        value = call("GET", f"{g}/messages/{m['id']}/$value").content
    with start_simulator(SimConfig(**cfg)) as sim2:
        g2 = f"{sim2.graph_url}/users/{uid}"
        assert sim2.truth(semantic=True) == before
        assert call("GET", f"{g2}/messages/{m['id']}/$value").content == value
        got = call("GET", f"{g2}/messages", params={
            "$filter": f"singleValueExtendedProperties/any(x: x/id eq '{MARK}' and x/value eq 'k1')"}).json()
        assert [x["id"] for x in got["value"]] == [m["id"]]
        ups, rem, _, _ = delta_all(sim2, uid, f["id"], link.replace(sim.base_url, sim2.base_url))
        assert ups == {} and rem == []
        # new items after the restart do not reuse ids
        n = post_message(g2, "inbox", received_item())
        assert n["id"] not in {i["id"] for i in before["mailboxes"][upn]["items"]} and n["id"] != gone["id"]


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
        assert s["internet_message_id"] == mb.internet_message_id(m)
        assert s["date"] == m.received.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert s["from"] == [x.lower() for x in s["from"]] and s["sender"] == s["from"]
        seen["inline"] += any(a["is_inline"] and a["content_id"] for a in s["attachments"])
        seen["attached"] += bool(s["attached_messages"])
        seen["8bit"] += any(b > 127 for b in data.split(b"\r\n\r\n", 1)[0])
        seen["nonascii_name"] += any(not n.isascii() for n in s["names"]["from"] + s["names"]["to"])
        seen["huge"] += any(a["size"] > 25 * 1024 * 1024 for a in s["attachments"])
        assert "Kind regards" in s["body_text"]  # the HTML alternative is what a reader sees
    assert all(seen.values()), seen
    sem = sim.truth(upn, semantic=True)["mailboxes"][upn]["items"]
    assert len(sem) == len(msgs) and all(set(i["semantic"]) >= {"body_text", "is_read", "flag_status", "received_at"}
                                         for i in sem)


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


def _restore_json(mime: bytes) -> tuple[dict, list[tuple[str, bytes, str, bool, str | None]]]:
    """A minimal restore of one MIME item into Graph JSON (what the restore engine will do, much better):
    (the message JSON with its small attachments, the big file attachments to upload)."""
    from email.utils import getaddresses, parsedate_to_datetime

    msg = email.message_from_bytes(mime, policy=email.policy.default)

    def addrs(h):
        return [ea(a, n) for n, a in getaddresses([str(x) for x in msg.get_all(h, [])])]

    def when(h):
        return parsedate_to_datetime(msg[h]).strftime("%Y-%m-%dT%H:%M:%SZ")

    body = msg.get_body(("html", "plain"))
    out = {"subject": str(msg["Subject"] or ""), "toRecipients": addrs("To"), "ccRecipients": addrs("Cc"),
           "body": {"contentType": "html" if body.get_content_subtype() == "html" else "text",
                    "content": body.get_content()},
           "singleValueExtendedProperties": props(**{FLAGS: "1", SENT: when("Date"), RECEIVED: when("Date")})}
    if msg["From"]:
        out["from"] = addrs("From")[0]
    if msg["Message-ID"]:
        out["internetMessageId"] = str(msg["Message-ID"])
    atts, big = [], []

    def leaves(p):  # the leaf parts, not descending into attached messages
        if p.is_multipart() and p.get_content_type() != "message/rfc822":
            for sub in p.get_payload():
                yield from leaves(sub)
        else:
            yield p

    for part in leaves(msg):
        if part.get_content_type() in ("text/plain", "text/html") and not part.get_filename():
            continue  # the body (and its other alternative)
        if part.get_content_type() == "message/rfc822":
            inner, _ = _restore_json(part.get_payload()[0].as_bytes())
            atts.append({"@odata.type": "#microsoft.graph.itemAttachment", "name": part.get_filename() or "item",
                         "item": {"@odata.type": "#microsoft.graph.message", **inner}})
            continue
        data = part.get_payload(decode=True)
        inline = (part.get_content_disposition() or "") == "inline"
        cid = part["Content-ID"].strip("<>") if part["Content-ID"] else None
        if len(data) > 3 * 1024 * 1024:
            big.append((part.get_filename(), data, part.get_content_type(), inline, cid))
        else:
            atts.append(file_att(part.get_filename(), data, part.get_content_type(), isInline=inline, contentId=cid))
    out["attachments"] = atts
    return out, big


def test_a_seeded_item_restored_elsewhere_summarizes_equal(sim_factory):
    """summarize(original) == summarize(restored): the comparison the restore engine's tests will make."""
    src = sim_factory(users=1, messages_per_mailbox=150, seed=5)
    dst = sim_factory(users=1, messages_per_mailbox=5, seed=6)
    upn = next(u for u in src.truth(hashes=False)["mailboxes"] if not u.startswith("shared"))
    mb = src.model.mailbox(upn)
    msgs = sorted(mb.msgs.values(), key=lambda m: m.id)
    picked = {}
    for m in msgs:
        s = summarize(mb.mime(m))
        for kind, ok in (("inline", any(a["is_inline"] for a in s["attachments"])),
                         ("attached", bool(s["attached_messages"])),
                         ("big", any(a["size"] > 3 * 1024 * 1024 for a in s["attachments"])),
                         ("nonascii", not s["subject"].isascii() or any(not n.isascii() for n in s["names"]["from"])),
                         ("plain", not s["attachments"])):
            if ok and kind not in picked:
                picked[kind] = m
    assert set(picked) == {"inline", "attached", "big", "nonascii", "plain"}, set(picked)
    _, duid, g = base(dst)
    for kind, m in picked.items():
        original = mb.mime(m)
        body, big = _restore_json(original)
        r = call("POST", f"{g}/mailFolders/inbox/messages", json=body)
        assert r.status_code == 201, (kind, r.text)
        mid = r.json()["id"]
        for name, data, ctype, inline, cid in big:
            s = call("POST", f"{g}/messages/{mid}/attachments/createUploadSession",
                     json={"AttachmentItem": {"attachmentType": "file", "name": name, "size": len(data),
                                              "contentType": ctype, "isInline": inline, "contentId": cid}}).json()
            assert upload(s["uploadUrl"], data)[-1].status_code == 201
        restored = call("GET", f"{g}/messages/{mid}/$value").content
        assert restored != original
        assert summarize(restored) == summarize(original), kind


# other ways of running it ------------------------------------------------------------------------------------------------

def test_child_process_cli_flags_and_https_upload_origin(tmp_path):
    import subprocess
    import sys

    from mailpipe.sim import SimProcess

    with SimProcess(SimConfig(users=1, messages_per_mailbox=5)) as p:
        upn = next(u for u in p.truth(hashes=False)["mailboxes"] if not u.startswith("shared"))
        g = f"{p.graph_url}/users/{upn}"
        m = post_message(g, "inbox", received_item())
        s = call("POST", f"{g}/messages/{m['id']}/attachments/createUploadSession",
                 json={"AttachmentItem": {"attachmentType": "file", "name": "x", "size": 3_200_000}}).json()
        assert p.upload_base_url and s["uploadUrl"].startswith(p.upload_base_url)
        assert upload(s["uploadUrl"], os.urandom(3_200_000))[-1].status_code == 201
        [item] = [i for i in p.truth(upn, semantic=True)["mailboxes"][upn]["items"] if i["id"] == m["id"]]
        assert item["semantic"]["attachments"][0]["size"] == 3_200_000
        assert p.stats()["attachments_added"][upn] == 1
    proc = subprocess.Popen([sys.executable, "-m", "mailpipe", "sim", "serve", "--users", "1", "--messages", "5",
                             "--upload-bytes", "2000", "--upload-window-seconds", "60"],
                            stdout=subprocess.PIPE, text=True)
    try:
        ep = json.loads(proc.stdout.readline())
        upn = httpx.get(f"{ep['graph_url']}/users", headers=H, timeout=10).json()["value"][0]["userPrincipalName"]
        g = f"{ep['graph_url']}/users/{upn}"
        codes = [call("POST", f"{g}/mailFolders/inbox/messages", json=received_item()).status_code for _ in range(6)]
        assert codes[0] == 201 and codes[-1] == 429
    finally:
        proc.terminate()
        proc.wait(10)
    cfg = SimConfig(users=1, messages_per_mailbox=5, tls=True, clients={"cid": "s3cr3t"}, state_dir=str(tmp_path))
    with start_simulator(cfg) as sim:
        c = httpx.Client(verify=sim.ca_file, timeout=30)
        tok = c.post(f"{sim.authority}/{sim.model.tenant_id}/oauth2/v2.0/token",
                     data={"grant_type": "client_credentials", "client_id": "cid", "client_secret": "s3cr3t",
                           "scope": "x"}).json()["access_token"]
        upn, uid = first_user(sim)
        auth = {"Authorization": f"Bearer {tok}"}
        m = c.post(f"{sim.graph_url}/users/{uid}/mailFolders/inbox/messages", json=received_item(), headers=auth).json()
        s = c.post(f"{sim.graph_url}/users/{uid}/messages/{m['id']}/attachments/createUploadSession", headers=auth,
                   json={"AttachmentItem": {"attachmentType": "file", "name": "x", "size": 3_200_000}}).json()
        assert s["uploadUrl"].startswith("https://127.0.0.1:") and s["uploadUrl"].startswith(sim.upload_base_url)
        data = os.urandom(3_200_000)
        r = c.put(s["uploadUrl"], content=data, headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"})
        assert r.status_code == 201
