"""Retention policies: which snapshots a policy keeps, and why. Pure: no I/O.

The rules are restic's ``forget --keep-*`` (restic 0.17's ``ApplyPolicy``), with calendar periods in the
tenant's time zone; docs/CONFIG.md ("Retention") states them for users. In short, snapshots are walked
newest first and

- ``last: N`` keeps the N newest snapshots;
- ``hourly``/``daily``/``weekly``/``monthly``/``yearly: N`` keep the newest snapshot of each of the N most
  recent local clock hours / days / ISO weeks / months / years that have a snapshot — and, when fewer
  than N such periods exist, the oldest snapshot too (restic ≥ 0.17: the longest history the counts allow);
- ``within: D`` keeps every snapshot committed after (newest snapshot − D); the newest snapshot is the
  newest one not in the future, as in restic;
- a snapshot pinned by an unfinished restore is kept (like restic's ``--keep-tag``: it does not use up
  a count);
- the newest snapshot is always kept.

A rule's count of ``-1`` (``unlimited`` in the tenants file) keeps the newest snapshot of every period.
"""

from __future__ import annotations

import calendar
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

UNLIMITED = -1
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
MAX_COUNT = 1_000_000
NO_POLICY = "no retention policy"

_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?$")


@dataclass(frozen=True)
class Duration:
    """A ``within`` duration: years, months, weeks and days are calendar steps in the tenant's time zone
    (``1d`` across a DST change is 23 or 25 hours); hours are absolute."""
    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``36h``, ``30d``, ``2w``, ``6m``, ``1y``, or a combination in that order of units (``1y6m``)."""
        m = _DURATION.match(text.strip()) if isinstance(text, str) else None
        if not m or not any(m.groups()):
            raise ValueError(f"not a duration: {text!r} (examples: 36h, 30d, 2w, 6m, 1y, 1y6m)")
        d = cls(*(int(g or 0) for g in m.groups()))
        if d == cls():
            raise ValueError(f"not a duration: {text!r} (it is zero)")
        return d

    def __str__(self) -> str:
        return "".join(f"{n}{u}" for n, u in zip((self.years, self.months, self.weeks, self.days, self.hours),
                                                  "ymwdh") if n)

    def before(self, t: datetime, tz: ZoneInfo) -> datetime:
        """``t`` minus this duration: years and months first on the local calendar (a day past the end of
        the month becomes its last day: 31 March − 1m = 28 or 29 February), then weeks and days (same local
        clock time), then hours (absolute)."""
        local = t.astimezone(tz)
        months = local.year * 12 + local.month - 1 - self.years * 12 - self.months
        year, month = divmod(months, 12)
        month += 1
        day = min(local.day, calendar.monthrange(year, month)[1])
        wall = local.replace(tzinfo=None, year=year, month=month, day=day) - timedelta(days=7 * self.weeks + self.days)
        return wall.replace(tzinfo=tz).astimezone(timezone.utc) - timedelta(hours=self.hours)


@dataclass(frozen=True)
class KeepPolicy:
    """What to keep: counts per rule (0: rule off, -1: unlimited), ``within``, or ``all`` (never forget)."""
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    all: bool = False

    def describe(self) -> str:
        if self.all:
            return "keep all"
        parts = [f"{r} {_count(getattr(self, r))}" for r in COUNT_RULES if getattr(self, r)]
        if self.within is not None:
            parts.append(f"within {self.within}")
        return "keep " + ", ".join(parts)


@dataclass(frozen=True)
class MailboxRetention:
    """A per-mailbox override: the first whose glob matches a mailbox's UPN replaces the tenant's ``keep``."""
    match: tuple[str, ...]
    keep: KeepPolicy

    def matches(self, upn: str) -> bool:
        u = upn.lower()
        return any(fnmatch.fnmatchcase(u, p.lower()) for p in self.match)


@dataclass(frozen=True)
class RetentionConfig:
    keep: KeepPolicy | None = None
    timezone: str = "UTC"
    mailboxes: tuple[MailboxRetention, ...] = ()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def policy_for(self, upn: str) -> KeepPolicy | None:
        """The first matching override's policy, else the tenant's (None: no policy, keep everything)."""
        for o in self.mailboxes:
            if o.matches(upn):
                return o.keep
        return self.keep


# -- deciding ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    snapshot_id: str
    committed_at: datetime
    keep: bool
    reasons: tuple[str, ...]  # why it is kept (empty when forgotten)


def _count(n: int) -> str:
    return "unlimited" if n == UNLIMITED else str(n)


# (rule, the period a local time falls in, its label); ``last`` makes every snapshot its own period
_PERIODS: dict[str, Callable[[datetime], tuple[Any, str]]] = {
    "hourly": lambda t: ((t.year, t.month, t.day, t.hour), f"{t:%Y-%m-%d %H}:00"),
    "daily": lambda t: ((t.year, t.month, t.day), f"{t:%Y-%m-%d}"),
    "weekly": lambda t: (t.isocalendar()[:2], "{}-W{:02d}".format(*t.isocalendar()[:2])),
    "monthly": lambda t: ((t.year, t.month), f"{t:%Y-%m}"),
    "yearly": lambda t: (t.year, f"{t:%Y}"),
}


def decide(snapshots: Iterable[tuple[str, datetime]], policy: KeepPolicy | None, tz: ZoneInfo | str = "UTC", *,
           now: datetime | None = None, pinned: Mapping[str, str] | None = None) -> list[Decision]:
    """Keep or forget each of ``snapshots`` ((id, aware commit time) pairs), newest first, with the reasons
    each kept one is kept. ``pinned``: snapshot id → why it must stay (an unfinished restore reads it).
    ``policy`` None: no policy, everything is kept."""
    tz = ZoneInfo(tz) if isinstance(tz, str) else tz
    pinned = pinned or {}
    # newest first; equal times in id order (ids sort by time, then a random suffix)
    order = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    if policy is None or policy.all:
        why = NO_POLICY if policy is None else "keep all"
        return [Decision(sid, t, True, tuple(filter(None, (pinned.get(sid), why)))) for sid, t in order]
    now = now or datetime.now(timezone.utc)
    cutoff = None
    if policy.within is not None:
        # restic: relative to the newest snapshot that is not in the future; none → everything is within
        latest = max((t for _, t in order if t <= now), default=None)
        cutoff = policy.within.before(latest, tz) if latest is not None else None
    left = {r: getattr(policy, r) for r in COUNT_RULES}
    seen: dict[str, Any] = {}  # rule → the period of the last snapshot it kept
    out: list[Decision] = []
    for nr, (sid, t) in enumerate(order):
        local = t.astimezone(tz)
        reasons: list[str] = []
        if sid in pinned:
            reasons.append(pinned[sid])
        if policy.within is not None and (cutoff is None or t > cutoff):
            reasons.append(f"within {policy.within}")
        for rule in COUNT_RULES:
            if left[rule] == 0:
                continue
            if rule == "last":
                period, label = nr, f"last {_count(policy.last)}"
            else:
                period, label = _PERIODS[rule](local)
                label = f"{rule} {label}"
            oldest = nr == len(order) - 1
            if rule in seen and period == seen[rule] and not oldest:
                continue
            if rule in seen and period == seen[rule]:
                label = f"oldest {label}"  # restic: counts are left at the oldest snapshot: keep it too
            seen[rule] = period
            if left[rule] > 0:
                left[rule] -= 1
            reasons.append(label)
        if nr == 0 and not reasons:
            reasons.append("newest")  # never reached with a non-empty policy; the guarantee is kept here
        out.append(Decision(sid, t, bool(reasons), tuple(reasons)))
    return out


# -- the tenants file ---------------------------------------------------------------------------------------

def parse_retention(raw: Any, err: Callable[[str, str], Exception]) -> RetentionConfig | None:
    """The ``retention:`` mapping of a tenant (docs/CONFIG.md); ``err(field, message)`` makes the error to
    raise (the caller's, naming the file and the tenant)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise err("retention", "expected a mapping with keep:, timezone:, mailboxes:")
    unknown = set(raw) - {"keep", "timezone", "mailboxes"}
    if unknown:
        raise err("retention", f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    tzname = raw.get("timezone", "UTC")
    if not isinstance(tzname, str) or not _zone_ok(tzname):
        raise err("retention.timezone", f"not an IANA time zone name (e.g. Europe/Paris, UTC): {tzname!r}")
    keep = _parse_keep(raw["keep"], "retention.keep", err) if raw.get("keep") is not None else None
    overrides_raw = raw.get("mailboxes") or []
    if not isinstance(overrides_raw, list):
        raise err("retention.mailboxes", "expected a list of {match: GLOB, keep: {...}}")
    overrides = []
    for i, o in enumerate(overrides_raw):
        fld = f"retention.mailboxes[{i}]"
        if not isinstance(o, dict):
            raise err(fld, "expected a mapping {match: GLOB, keep: {...}}")
        unknown = set(o) - {"match", "keep"}
        if unknown:
            raise err(fld, f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        match = o.get("match")
        if isinstance(match, str):
            match = [match]
        if not isinstance(match, list) or not match or not all(isinstance(p, str) and p for p in match):
            raise err(f"{fld}.match", "expected a glob over user principal names, or a list of them")
        if o.get("keep") is None:
            raise err(f"{fld}.keep", "required: the rules for these mailboxes (or 'all')")
        overrides.append(MailboxRetention(tuple(match), _parse_keep(o["keep"], f"{fld}.keep", err)))
    if keep is None and not overrides:
        raise err("retention", "set keep: (and optionally mailboxes:), or remove retention: to keep everything")
    return RetentionConfig(keep=keep, timezone=tzname, mailboxes=tuple(overrides))


def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
        return True
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError; a folder is an OSError
        return False


def _parse_keep(raw: Any, fld: str, err: Callable[[str, str], Exception]) -> KeepPolicy:
    if raw == "all":
        return KeepPolicy(all=True)
    if not isinstance(raw, dict):
        raise err(fld, "expected a mapping of rules (last, hourly, daily, weekly, monthly, yearly, within), or 'all'")
    unknown = set(raw) - {*COUNT_RULES, "within"}
    if unknown:
        raise err(fld, f"unknown field(s): {', '.join(sorted(map(str, unknown)))} (rules: "
                       f"{', '.join(COUNT_RULES)}, within)")
    counts = {}
    for rule in COUNT_RULES:
        v = raw.get(rule, 0)
        if v == "unlimited":
            v = UNLIMITED
        elif isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
            raise err(f"{fld}.{rule}", f"expected a whole number from 0 to {MAX_COUNT} or 'unlimited' (got {v!r})")
        counts[rule] = v
    within = None
    if raw.get("within") is not None:
        try:
            within = Duration.parse(raw["within"])
        except ValueError as e:
            raise err(f"{fld}.within", str(e)) from None
    if within is None and not any(counts.values()):
        raise err(fld, "no rule set: give at least one of last, hourly, daily, weekly, monthly, yearly, within "
                       "(or 'all')")
    return KeepPolicy(**counts, within=within)
