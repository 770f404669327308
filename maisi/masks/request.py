"""An anatomy request checked against the label dictionary, without torch, so that a config's checks
(:mod:`maisi.families.checks`) can run it before any work: known names, lesions with classes of their own, at
most one tumour class; and which ids of a label dictionary are tumours.
"""

from __future__ import annotations

import difflib
import re

from maisi.config.infer_config import AnatomyConfig
from maisi.labels import BODY_LABEL
from maisi.resources import load_json

MAISI_TUMOUR_IDS: frozenset[int] = frozenset({23, 24, 26, 27, 128})
_TUMOUR_NAME = re.compile(r"tumou?r|cancer|lesion|metasta|carcinoma|nodule", re.IGNORECASE)


def tumour_ids(label_dict: dict[str, int]) -> frozenset[int]:
    """MAISI's tumour ids, plus classes a user added whose name says tumour (tumor, cancer, lesion, ...).

    A class counts as added when its name is not one of MAISI's dictionary, so MAISI's own dictionary
    gives exactly MAISI's five ids (its kidney cysts are not excluded, as in MAISI).
    """
    maisi_names = set(load_json("maisi_label_dict.json"))
    added = {i for n, i in label_dict.items() if n not in maisi_names and _TUMOUR_NAME.search(n)}
    return MAISI_TUMOUR_IDS | frozenset(added)


def _unknown(name: str, where: str, label_dict: dict[str, int]) -> str:
    hints = difflib.get_close_matches(name, list(label_dict), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
    return f"{where}: '{name}' is not in the label dictionary{hint} (python -m maisi.labels show lists them)"


def anatomy_problems(anatomy: AnatomyConfig, label_dict: dict[str, int]) -> list[str]:
    """MAISI's ``check_input`` rules on the names of a request, every problem with its JSON path.

    Names must be in the label dictionary (did-you-mean), at most one tumour class may be requested
    (``anatomy_list`` and lesions together; MAISI allows one), and a lesion needs a class of its own that
    is neither the body nor one of its hosts.
    """
    problems = []
    for i, name in enumerate(anatomy.anatomy_list):
        if name not in label_dict:
            problems.append(_unknown(name, f"$.anatomy.anatomy_list[{i}]", label_dict))
    for i, lesion in enumerate(anatomy.lesions):
        where = f"$.anatomy.lesions[{i}]"
        if lesion.label not in label_dict:
            problems.append(_unknown(lesion.label, f"{where}.label", label_dict))
        for j, host in enumerate(lesion.host):
            if host not in label_dict:
                problems.append(
                    _unknown(host, f"{where}.host" + (f"[{j}]" if len(lesion.host) > 1 else ""), label_dict)
                )
        if lesion.label in lesion.host:
            problems.append(
                f"{where}: label '{lesion.label}' is also its host; a lesion needs a class of its own"
            )
        if label_dict.get(lesion.label) == BODY_LABEL:
            problems.append(
                f"{where}.label: '{lesion.label}' is the body label {BODY_LABEL}; choose a lesion class"
            )
    tumours = tumour_ids(label_dict)
    requested = [*anatomy.anatomy_list, *(lesion.label for lesion in anatomy.lesions)]
    named = list(dict.fromkeys(n for n in requested if label_dict.get(n) in tumours))
    if len(named) > 1:
        problems.append(
            f"$.anatomy: {len(named)} tumour classes requested ({', '.join(repr(n) for n in named)}); "
            "MAISI generates at most one tumour class per CT"
        )
    return problems
