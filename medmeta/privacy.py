"""What of a patient's identity may leave medmeta: the privacy policy of ``adapt``'s outputs.

Two rules, in the spirit of DICOM PS3.15 Annex E (the Basic Application Level Confidentiality
Profile):

- **DICOM attributes.** No attribute in :data:`IDENTIFYING` (names, identifiers, dates and
  times, addresses, institutions, physicians, free-text descriptions and comments: the
  attributes Annex E removes or replaces) appears in any output (report files, DICOM SRs, the
  PDF, the console) unless the user allows it by keyword (``--allow-dicom PatientID``). Nothing
  else of a scan's header is written either, except the attributes a DICOM reference needs
  (:data:`REFERENCE_UIDS`: study, series and instance UIDs, kept so that a Structured Report
  points at its image, as Annex E's "Retain UIDs" option keeps them).
- **De-identification** (``--deidentify``). File and folder names, patient folders and the cases
  folder's location are replaced by salted hashes (HMAC-SHA256 with a secret salt, the first 16
  hex digits), and the reference UIDs by UIDs derived from them the same way (``2.25.<number>``,
  Annex E's "U" action). The same name gives the same pseudonym within a run, so patients stay
  grouped and SRs still reference their images; with the same salt (``--salt-file``) across
  runs. Without a salt file the salt is drawn at random and never written: the pseudonyms
  cannot be traced back, not even by the user. Scan suffixes (``.dcm``, ``.nii.gz``) and
  condition names are kept.

Pixels are not inspected: text burned into an image (a name in a corner of a radiograph)
shows in its thumbnail. ``docs/privacy.md`` says what this does and does not protect.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from medmeta.errors import MedmetaError

#: Attributes that identify a patient, directly or with other data (DICOM PS3.15 Annex E, Table
#: E.1-1, the attributes most often found in image headers): keyword -> what it holds.
IDENTIFYING: dict[str, str] = {
    "PatientName": "the patient's name",
    "PatientID": "the patient's identifier at the hospital",
    "IssuerOfPatientID": "who issued the patient identifier",
    "OtherPatientIDs": "other identifiers of the patient",
    "OtherPatientNames": "other names of the patient",
    "PatientBirthName": "the patient's birth name",
    "PatientMotherBirthName": "the patient's mother's birth name",
    "PatientBirthDate": "date of birth",
    "PatientBirthTime": "time of birth",
    "PatientSex": "sex",
    "PatientAge": "age",
    "PatientSize": "height",
    "PatientWeight": "weight",
    "PatientAddress": "address",
    "PatientTelephoneNumbers": "telephone numbers",
    "MilitaryRank": "military rank",
    "EthnicGroup": "ethnic group",
    "Occupation": "occupation",
    "PatientComments": "comments on the patient",
    "AdditionalPatientHistory": "the patient's history",
    "MedicalRecordLocator": "where the medical record is",
    "AccessionNumber": "the order's number",
    "StudyID": "the study's identifier",
    "StudyDate": "date of the study",
    "StudyTime": "time of the study",
    "SeriesDate": "date of the series",
    "SeriesTime": "time of the series",
    "AcquisitionDate": "date of acquisition",
    "AcquisitionTime": "time of acquisition",
    "AcquisitionDateTime": "date and time of acquisition",
    "ContentDate": "date of the image content",
    "ContentTime": "time of the image content",
    "InstanceCreationDate": "date the instance was created",
    "InstanceCreationTime": "time the instance was created",
    "InstitutionName": "the hospital",
    "InstitutionAddress": "the hospital's address",
    "InstitutionalDepartmentName": "the department",
    "StationName": "the scanner's network name",
    "DeviceSerialNumber": "the scanner's serial number",
    "ReferringPhysicianName": "the referring physician",
    "PerformingPhysicianName": "the performing physician",
    "NameOfPhysiciansReadingStudy": "the reading physicians",
    "OperatorsName": "the operators",
    "RequestingPhysician": "the requesting physician",
    "StudyDescription": "free text on the study",
    "SeriesDescription": "free text on the series",
    "ImageComments": "free text on the image",
    "RequestedProcedureDescription": "free text on the procedure",
    "PerformedProcedureStepDescription": "free text on the procedure step",
    "ProtocolName": "the acquisition protocol's name (often holds free text)",
}

#: UIDs a DICOM reference needs (see the module): kept by default, replaced by ``--deidentify``.
REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")

#: The shortest file or folder name :meth:`PrivacyPolicy.text` replaces on its own (outside a path).
MIN_NAME = 3

#: What every pseudonym is: 16 lowercase hex digits.
PSEUDONYM = re.compile(r"[0-9a-f]{16}")

#: Suffixes kept on a pseudonymised file name (they say the format, not the patient).
_KEPT_SUFFIXES = (".nii.gz", ".dcm", ".dicom", ".nii", ".png", ".jpg", ".jpeg", ".npz", ".ima")


@dataclass(frozen=True)
class PrivacyPolicy:
    """The policy of one run (see the module).

    Attributes:
        allow: keywords of :data:`IDENTIFYING` attributes that may appear in outputs.
        deidentify: replace names, paths and reference UIDs with salted hashes.
        salt: the secret of the hashes (random unless given; never written anywhere).
    """

    allow: frozenset[str] = frozenset()
    deidentify: bool = False
    salt: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allow) - set(IDENTIFYING))
        if unknown:
            raise MedmetaError(
                f"--allow-dicom: {', '.join(unknown)} is not an identifying attribute medmeta knows; "
                f"allowed keywords: {', '.join(sorted(IDENTIFYING))}"
            )
        if not self.salt:
            raise MedmetaError("the de-identification salt is empty")

    @classmethod
    def from_options(cls, allow: Iterable[str] = (), deidentify: bool = False, salt_file: str | Path | None = None):
        """The policy of ``--allow-dicom`` (keywords, or comma-separated lists of them),
        ``--deidentify`` and ``--salt-file`` (a file whose bytes are the secret salt)."""
        keywords = frozenset(k.strip() for item in allow for k in str(item).split(",") if k.strip())
        if salt_file is not None:
            if not deidentify:
                raise MedmetaError("--salt-file is the secret of --deidentify: give both or neither")
            try:
                salt = Path(salt_file).read_bytes()
            except OSError as exc:
                raise MedmetaError(f"{salt_file}: cannot read the salt file ({exc.strerror or exc})") from None
            if len(salt) < 16:
                raise MedmetaError(f"{salt_file}: a salt needs at least 16 bytes (e.g. `head -c 32 /dev/urandom > FILE`)")
            return cls(keywords, deidentify, salt)
        return cls(keywords, deidentify)

    # -- attributes ------------------------------------------------------------------------------
    def allows(self, keyword: str) -> bool:
        """Whether an identifying attribute (or a reference UID) may appear in outputs as it is."""
        if keyword in REFERENCE_UIDS:
            return not self.deidentify
        return keyword in self.allow

    def attributes(self, dataset: Any) -> dict[str, str]:
        """The allowed identifying attributes of a DICOM ``dataset`` that it holds, as text (with
        ``--deidentify`` a patient identifier is pseudonymised too); empty by default."""
        found = {}
        for keyword in sorted(self.allow):
            value = getattr(dataset, keyword, None)
            if value is None or str(value) == "":
                continue
            text = str(value)
            found[keyword] = self.pseudonym(text) if self.deidentify and keyword in _PATIENT_KEYS else text
        return found

    def uid(self, uid: str) -> str:
        """A reference UID as outputs may hold it: unchanged, or with ``--deidentify`` a UID
        derived from it by the salted hash (``2.25.`` then a decimal number, at most 64 characters)."""
        if not self.deidentify:
            return uid
        digest = hmac.new(self.salt, b"uid:" + uid.encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    # -- names -----------------------------------------------------------------------------------
    def pseudonym(self, name: str) -> str:
        """The salted hash of ``name``: 16 hex digits."""
        return hmac.new(self.salt, name.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]

    def path(self, path: str, conditions: Iterable[str] = ()) -> str:
        """A path relative to the cases folder as outputs may name it: unchanged, or with
        ``--deidentify`` every part pseudonymised except ``query``/``support``, a support scan's
        condition (the folder under ``support/`` of a scan, or one of ``conditions``) and the
        file's format suffix."""
        if not self.deidentify:
            return path
        parts = PurePosixPath(path).parts
        # a condition folder is kept, a file directly under support/ is not (it names no condition)
        condition = len(parts) >= 2 and parts[0] == "support" and (len(parts) >= 3 or parts[1] in set(conditions))
        kept = 2 if condition else 1 if parts and parts[0] in ("query", "support") else 0
        out = list(parts[:kept])
        for index, part in enumerate(parts[kept:], start=kept):
            suffix = _suffix(part) if index == len(parts) - 1 else ""
            out.append(self.pseudonym(part) + suffix)
        return "/".join(out)

    def text(self, text: str, paths: Mapping[str, str], folder: str | Path | None = None) -> str:
        """``text`` as :meth:`scrubber` leaves it (for one text; build the scrubber once for many)."""
        return self.scrubber(paths, folder)(text)

    def scrubber(
        self, paths: Mapping[str, str], folder: str | Path | None = None, keep: Iterable[str] = ()
    ) -> Callable[[str], str]:
        """A function that replaces, in a text (a note, a rejection reason, an error), every
        original file or folder name of ``paths`` (original path -> output path) by its output
        form, and the cases ``folder``'s location (as given and absolute) by ``CASES``; the
        identity without ``--deidentify``. Names in ``keep`` (the conditions) stay.

        The text is cut into pieces of letters, digits, ``_``, ``-`` and ``.``; a piece (or the
        piece without trailing dots) that is a name is replaced, whatever surrounds it, so the
        rule errs towards replacing. A name of fewer than :data:`MIN_NAME` characters only
        inside a path (next to a ``/`` or ``\\``): a patient folder ``1`` leaves "1 link" alone.
        A name holding other characters (``jane doe.dcm``) is replaced as written, looked for
        only in texts that hold its first piece. The folder's location as given (``cases``) is
        replaced only where a path or an error starts with it (``cases/query``, ``cases: ...``),
        its absolute form wherever it stands whole. The work per text is about one pass over it."""
        if not self.deidentify:
            return lambda text: text
        return _Scrubber(_renamed_parts(paths, set(keep)), _location_pattern(folder))


def _renamed_parts(paths: Mapping[str, str], keep: set[str]) -> dict[str, str]:
    """Each original file or folder name of ``paths`` (original -> output) that the output
    renames, outside ``keep`` -> its output form."""
    parts: dict[str, str] = {}
    for original, shown in paths.items():
        for part, new in zip(reversed(PurePosixPath(original).parts), reversed(PurePosixPath(shown).parts)):
            if part != new and part not in keep:
                parts.setdefault(part, new)
    return parts


def _location_pattern(folder: str | Path | None) -> re.Pattern | None:
    """Where a text names the cases ``folder``: its absolute form wherever it stands whole; the
    form as given (possibly a word such as "cases") only as the start of a path or of an error,
    ``cases/...`` or ``cases: ...``."""
    forms = {str(folder).rstrip("/"), str(Path(folder).resolve())} - {"", "."} if folder else set()
    alternatives = [re.escape(f) + (r"(?![\w\-]|\.[\w\-])" if f.startswith("/") else r"(?=[/:])")
                    for f in sorted(forms, key=len, reverse=True)]
    return re.compile(r"(?<![\w.\-/])(?:" + "|".join(alternatives) + ")") if alternatives else None


class _Scrubber:
    """:meth:`PrivacyPolicy.scrubber`'s function: ``parts`` (original name -> output name) and
    the cases folder's ``location`` pattern, applied to one text at a time."""

    def __init__(self, parts: dict[str, str], location: re.Pattern | None):
        self.parts, self.location = parts, location
        self.odd: dict[str, list[str]] = {}  # first piece -> names that are not one piece, longest first
        for name in sorted(parts, key=len, reverse=True):
            pieces = _PIECE.findall(name)
            if len(name) >= MIN_NAME and (len(pieces) != 1 or pieces[0] != name):
                self.odd.setdefault(pieces[0] if pieces else name, []).append(name)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self.location is not None:
            text = self.location.sub("CASES", text)
        for first in set(_PIECE.findall(text)) & self.odd.keys() if self.odd else ():
            for name in self.odd[first]:
                text = text.replace(name, self.parts[name])
        return _PIECE.sub(lambda match: self._swap(match, text), text)

    def _swap(self, match: re.Match, text: str) -> str:
        """A piece of ``text``, or its output form when it (or it without trailing dots) is a name."""
        piece = match.group(0)
        for name in (piece, piece.rstrip(".")):
            new = self.parts.get(name)
            if new is None:
                continue
            start, end = match.start(), match.start() + len(name)
            in_path = (start > 0 and text[start - 1] in "/\\") or (end < len(text) and text[end] in "/\\")
            if in_path or len(name) >= MIN_NAME:
                return new + piece[len(name):]
        return piece


#: A piece of a text that may be a whole file or folder name.
_PIECE = re.compile(r"[\w.\-]+")


#: Identifying attributes that name the patient: pseudonymised by ``--deidentify`` when allowed.
_PATIENT_KEYS = frozenset({"PatientID", "PatientName", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
                           "AccessionNumber", "StudyID", "MedicalRecordLocator"})


def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in _KEPT_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix):]
    return ""


DEFAULT_POLICY = PrivacyPolicy()
