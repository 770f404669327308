"""maisi.masks.retrieval: MAISI's filter, v2's ranking, seeded distinct picks, and what no entry satisfies."""

from __future__ import annotations

from pathlib import Path

import pytest

from maisi.data.datalist import one_hot
from maisi.errors import InputError
from maisi.labels import add_class, load_label_dict
from maisi.masks.database import MaskDatabase, parse_database
from maisi.masks.request import MAISI_TUMOUR_IDS, tumour_ids
from maisi.masks.retrieval import resolve_regions, select_masks

LIVER, SPLEEN, LUNG_LOBE, COLON, BRAIN, BODY = 1, 3, 28, 62, 22, 200
LUNG_TUMOUR, HEPATIC_TUMOUR, COLON_CANCER = 23, 26, 27


def record(path, labels, dim=(128, 128, 64), spacing=(3.0, 3.0, 3.0), regions=None):
    out = {
        "pseudo_label_filename": path,
        "label_list": sorted(labels),
        "dim": list(dim),
        "spacing": list(spacing),
    }
    if regions is not None:
        out["top_region_index"], out["bottom_region_index"] = one_hot(regions[0]), one_hot(regions[1])
    return out


def database(records) -> MaskDatabase:
    return MaskDatabase(Path("synthetic.json"), Path("."), tuple(parse_database(records, "synthetic.json")))


def select(db, anatomy=(), regions=(), size=(128, 128, 64), spacing=(3.0, 3.0, 3.0), num=1, seed=0, **kw):
    return select_masks(db, list(anatomy), list(regions), size, spacing, num, seed, **kw)


def picked(selection) -> list[str]:
    return [c.entry.path for c in selection.picks]


ABDOMEN = ("abdomen", "abdomen")
CHEST_ABDOMEN = ("chest", "abdomen")


def test_filter_needs_every_anatomy_every_region_and_no_unrequested_tumour():
    db = database(
        [
            record("liver_only.nii.gz", [LIVER, BODY], regions=ABDOMEN),
            record("liver_spleen.nii.gz", [LIVER, SPLEEN, BODY], regions=ABDOMEN),
            record("liver_spleen_chest.nii.gz", [LIVER, SPLEEN, LUNG_LOBE, BODY], regions=CHEST_ABDOMEN),
            record("liver_tumour.nii.gz", [LIVER, SPLEEN, HEPATIC_TUMOUR, BODY], regions=ABDOMEN),
        ]
    )
    every = select(db, ["liver", "spleen"], ["abdomen"], num=10).ranked
    assert sorted(c.entry.path for c in every) == ["liver_spleen.nii.gz", "liver_spleen_chest.nii.gz"]
    chest = select(db, ["liver"], ["thorax", "abdomen"], num=10).ranked
    assert [c.entry.path for c in chest] == ["liver_spleen_chest.nii.gz"]
    tumour = select(db, ["hepatic tumor"], ["abdomen"], num=10).ranked
    assert [c.entry.path for c in tumour] == ["liver_tumour.nii.gz"]


def test_tumour_ids_are_maisis_plus_tumour_classes_a_user_added():
    maisi = load_label_dict()
    assert tumour_ids(maisi) == MAISI_TUMOUR_IDS == {23, 24, 26, 27, 128}
    extended, kidney_tumour = add_class(maisi, "kidney tumor")
    extended, _ = add_class(extended, "stent")
    assert tumour_ids(extended) == MAISI_TUMOUR_IDS | {kidney_tumour}
    db = database(
        [
            record("kidney_tumour.nii.gz", [5, kidney_tumour, BODY], regions=ABDOMEN),
            record("kidney.nii.gz", [5, BODY], regions=ABDOMEN),
        ]
    )
    ranked = select(db, ["right kidney"], num=5, label_dict=extended).ranked
    assert [c.entry.path for c in ranked] == ["kidney.nii.gz"]


def test_regions_missing_from_an_entry_come_from_its_label_list():
    db = database([record("no_indices.nii.gz", [LIVER, LUNG_LOBE, BODY])])  # MAISI v2 makes them optional
    assert db.entries[0].regions == (1, 2)
    assert picked(select(db, ["liver"], ["chest"])) == ["no_indices.nii.gz"]
    with pytest.raises(
        InputError, match="no entry of synthetic.json .1 entries. covers body region 'pelvis'"
    ):
        select(db, ["liver"], ["pelvis"])


def test_region_names_as_maisi_spells_them_and_ours():
    assert resolve_regions(["Head", "chest", "thorax", "abdomen", "pelvis", "lower"]) == [0, 1, 1, 2, 3, 3]
    assert resolve_regions(["head_neck", "pelvis_lower", "chest/thorax"]) == [0, 3, 1]


def test_ranking_is_v2s_fov_dim_spacing_score_with_no_large_upsampling():
    size, spacing = (256, 256, 128), (1.5, 1.5, 2.0)
    db = database(
        [
            record("exact.nii.gz", [LIVER], dim=size, spacing=spacing),
            record("same_fov.nii.gz", [LIVER], dim=(384, 384, 256), spacing=(1.0, 1.0, 1.0)),
            record("other_fov.nii.gz", [LIVER], dim=(256, 256, 128), spacing=(1.0, 1.0, 1.0)),
            record("just_large.nii.gz", [LIVER], dim=(129, 256, 128), spacing=(3.0, 1.5, 2.0)),
            record("too_small.nii.gz", [LIVER], dim=(128, 256, 128), spacing=(3.0, 1.5, 2.0)),
        ]
    )
    ranked = select(db, ["liver"], size=size, spacing=spacing, num=5).ranked
    by_path = {c.entry.path: c for c in ranked}
    assert [c.entry.path for c in ranked] == [
        "exact.nii.gz",
        "just_large.nii.gz",  # 0.3 + 1.27 + 1.5
        "same_fov.nii.gz",  # 0 + 3.84 + 2
        "other_fov.nii.gz",  # 38.4 + 0 + 2
    ]
    assert by_path["exact.nii.gz"].score == 0
    same_fov = by_path["same_fov.nii.gz"]  # FOV equal: only dim and spacing count
    assert (same_fov.fov_term, same_fov.dim_term, same_fov.spacing_term) == pytest.approx((0, 3.84, 2.0))
    other = by_path["other_fov.nii.gz"]  # FOV 256 x 256 x 128 mm vs 384 x 384 x 256 mm
    assert (other.fov_term, other.dim_term, other.spacing_term) == pytest.approx((38.4, 0, 2.0))
    just_large = by_path["just_large.nii.gz"]  # 129 > 256 - 128: kept; 128 <= 128: rejected
    assert just_large.fov_term == pytest.approx(abs(129 * 3.0 - 384) / 10)
    assert "too_small.nii.gz" not in by_path
    assert same_fov.why() == "score 5.84 = FOV 0.00 + dim 3.84 + spacing 2.00"


def _many(n: int) -> MaskDatabase:
    """n liver masks ranked by z size: mask_00 closest to (128, 128, 64), then 65, 66, ..."""
    return database([record(f"mask_{i:02d}.nii.gz", [LIVER], dim=(128, 128, 64 + i)) for i in range(n)])


def test_same_seed_same_picks_and_picks_are_distinct_among_the_best():
    db = _many(20)
    first = select(db, ["liver"], num=4, seed=7)
    assert picked(first) == picked(select(db, ["liver"], num=4, seed=7))
    assert len(set(picked(first))) == 4
    assert first.pool_size == 8 and all(c.rank <= 8 for c in first.picks)  # MAISI's pool: max(2N, 5)
    draws = {tuple(picked(select(db, ["liver"], num=4, seed=s))) for s in range(10)}
    assert len(draws) > 1  # the seed matters


def test_picks_wrap_around_when_the_database_holds_fewer_masks_than_samples():
    selection = select(_many(2), ["liver"], num=5, seed=3)
    paths = picked(selection)
    assert sorted(set(paths)) == ["mask_00.nii.gz", "mask_01.nii.gz"]
    assert paths[2:] == paths[:3] and paths[0] != paths[1]  # each used before any repeats


@pytest.mark.parametrize(
    "anatomy, regions, size, fragment",
    [
        (["colon cancer primaries"], ["abdomen"], (128, 128, 64), "holds 'colon cancer primaries'"),
        (["liver"], ["pelvis"], (128, 128, 64), "covers body region 'pelvis'"),
        (["colon"], ["head"], (128, 128, 64), "holds 'colon' within 'head'"),
        (["liver", "brain"], [], (128, 128, 64), "holds 'liver', 'brain' together"),
        (["spleen"], [], (128, 128, 64), "also holds a tumour that was not requested ('lung tumor')"),
        (
            ["liver"],
            [],
            (512, 512, 64),
            "too small for output size [512, 512, 64]: each has dim <= output size - 128",
        ),
    ],
)
def test_an_unsatisfiable_request_names_what_no_entry_satisfies(anatomy, regions, size, fragment):
    db = database(
        [
            record("abdomen.nii.gz", [LIVER, COLON, BODY], regions=ABDOMEN),
            record("head.nii.gz", [BRAIN, BODY], regions=("head_neck", "head_neck")),
            record("spleen_tumour.nii.gz", [SPLEEN, LUNG_LOBE, LUNG_TUMOUR, BODY], regions=CHEST_ABDOMEN),
        ]
    )
    with pytest.raises(InputError) as err:
        select(db, anatomy, regions, size=size)
    assert str(err.value).startswith("cannot select masks: ")
    assert fragment in str(err.value)


def test_maisis_example_colon_cancer_within_head():
    db = database(
        [
            record("colon_cancer.nii.gz", [COLON, COLON_CANCER, BODY], regions=("abdomen", "pelvis_lower")),
            record("head.nii.gz", [BRAIN, BODY], regions=("head_neck", "head_neck")),
        ]
    )
    with pytest.raises(
        InputError,
        match="no entry of synthetic.json .2 entries. holds 'colon cancer primaries' within 'head'",
    ):
        select(db, ["colon cancer primaries"], ["head"])


def test_unknown_names_are_refused_together_with_suggestions():
    db = _many(1)
    with pytest.raises(InputError) as err:
        select(db, ["livr", "liver", "liver"], ["thorx", "nowhere"])
    message = str(err.value)
    assert "unknown anatomy 'livr'; did you mean 'liver'?" in message
    assert "anatomy 'liver' is given more than once" in message
    assert "unknown body region 'thorx'; did you mean 'thorax'" in message
    assert "unknown body region 'nowhere'" in message


@pytest.mark.parametrize(
    "size, spacing, num, fragment",
    [
        ((128, 128), (3.0, 3.0, 3.0), 1, "output size [128, 128]: expected 3 positive integers"),
        ((128, 128, 0), (3.0, 3.0, 3.0), 1, "output size [128, 128, 0]"),
        ((128, 128, 64), (3.0, 0.0, 3.0), 1, "spacing [3.0, 0.0, 3.0]: expected 3 finite positive values"),
        ((128, 128, 64), (3.0, float("inf"), 3.0), 1, "spacing [3.0, inf, 3.0]: expected 3 finite positive"),
        ((128, 128, 64), (3.0, 3.0, 3.0), 0, "number of samples 0: expected at least 1"),
    ],
)
def test_bad_grids_and_counts_are_refused(size, spacing, num, fragment):
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        select(_many(1), ["liver"], size=size, spacing=spacing, num=num)
