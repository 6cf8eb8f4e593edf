import pytest

from storage import keys


@pytest.mark.parametrize("bad", ["", "A", "-x", "a/b", "..", "a..b/", "x" * 64, "a b", "a\nb", "é"])
def test_invalid_ids_are_refused_with_the_field_name(bad):
    with pytest.raises(keys.InvalidId, match="person_id"):
        keys.validate_id(bad, field="person_id")


def test_slugify_strips_accents_and_punctuation():
    assert keys.slugify("Zoë O'Brien") == "zoe-obrien"
    assert keys.slugify("  Ada   Lovelace ") == "ada-lovelace"
    assert keys.slugify("李") == ""


def test_batch_ids_are_unique_valid_and_carry_the_name():
    ids = {keys.new_batch_id("Q3 Team!") for _ in range(50)}
    assert len(ids) == 50
    for batch_id in ids:
        assert batch_id.startswith("q3-team-")
        keys.validate_id(batch_id, field="batch_id")


def test_layout_matches_the_documented_keys():
    person = keys.PersonRef("acme", "q3-team-20261126-abcdef", "ada-lovelace")
    assert keys.headshot_key(person, "corporate-grey", 3, 1234) == \
        "acme/q3-team-20261126-abcdef/ada-lovelace/headshots/corporate-grey/003-1234.png"
    assert keys.person_contact_sheet_key(person) == "acme/q3-team-20261126-abcdef/ada-lovelace/contact-sheet.png"
    assert keys.batch_manifest_key("acme", "q3-team-20261126-abcdef") == \
        "acme/q3-team-20261126-abcdef/_batch/manifest.json"
    assert keys.batch_contact_sheet_key("acme", "b1") == "acme/b1/_batch/contact-sheet.png"
    for key in (keys.upload_key(person, 0, ".jpg"), keys.crop_key(person, 1), keys.lora_key(person),
                keys.checkpoint_key(person), keys.training_cache_key(person), keys.person_state_key(person)):
        assert key.startswith(person.prefix)


def test_a_person_ref_cannot_escape_its_prefix():
    with pytest.raises(keys.InvalidId):
        keys.PersonRef("acme", "b1", "../other")
