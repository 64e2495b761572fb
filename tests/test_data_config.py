"""Band names, statistics, class names and the 43 -> 19 mapping are consistent data."""

from utils.data_config import BigEarthNetInfo, EuroSATInfo


def test_bigearthnet_bands_and_statistics():
    assert BigEarthNetInfo.BAND_NAMES == [f"SR_B{i}" for i in range(1, 8)]
    for key in ("mean", "std"):
        assert len(BigEarthNetInfo.STATISTICS[key]) == 7
    assert BigEarthNetInfo.STATISTICS["mean"][4] == 16067.627  # NIR, the brightest band
    assert all(s > 0 for s in BigEarthNetInfo.STATISTICS["std"])


def test_bigearthnet_class_lists():
    names_43, names_19 = BigEarthNetInfo.CLASSES[43], BigEarthNetInfo.CLASSES[19]
    assert len(names_43) == len(set(names_43)) == 43
    assert len(names_19) == len(set(names_19)) == 19
    assert names_43[0] == "Continuous urban fabric" and names_43[-1] == "Sea and ocean"
    assert names_19[0] == "Urban fabric" and names_19[-1] == "Marine waters"


def test_match_labels_maps_into_every_19_class_and_drops_the_unmappable():
    mapping = BigEarthNetInfo.MATCH_LABELS
    assert set(mapping) <= set(range(43))
    assert set(mapping.values()) == set(range(19))
    dropped = {BigEarthNetInfo.CLASSES[43][i] for i in set(range(43)) - set(mapping)}
    assert dropped == {
        "Road and rail networks and associated land", "Port areas", "Airports",
        "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
        "Sport and leisure facilities", "Bare rock", "Burnt areas", "Intertidal flats"}


def test_match_labels_pairs_names_sensibly():
    name_43 = BigEarthNetInfo.CLASSES[43]
    name_19 = BigEarthNetInfo.CLASSES[19]
    mapped = {name_43[a]: name_19[b] for a, b in BigEarthNetInfo.MATCH_LABELS.items()}
    assert mapped["Continuous urban fabric"] == "Urban fabric"
    assert mapped["Discontinuous urban fabric"] == "Urban fabric"
    assert mapped["Rice fields"] == "Arable land"
    assert mapped["Olive groves"] == mapped["Vineyards"] == "Permanent crops"
    assert mapped["Sclerophyllous vegetation"] == "Moors, heathland and sclerophyllous vegetation"
    assert mapped["Sparsely vegetated areas"] == "Natural grassland and sparsely vegetated areas"
    assert mapped["Peatbogs"] == mapped["Inland marshes"] == "Inland wetlands"
    assert mapped["Salines"] == "Coastal wetlands"
    for name in ("Estuaries", "Coastal lagoons", "Sea and ocean"):
        assert mapped[name] == "Marine waters"
    # Names that exist in both lists map onto themselves.
    for name in set(name_43) & set(name_19):
        assert mapped[name] == name


def test_eurosat_info():
    assert EuroSATInfo.CLASSES == sorted(EuroSATInfo.CLASSES)
    assert len(set(EuroSATInfo.CLASSES)) == 10
    assert EuroSATInfo.BAND_NAMES == BigEarthNetInfo.BAND_NAMES + ["ST_B10"]
    for key in ("mean", "std"):
        assert len(EuroSATInfo.STATISTICS[key]) == 7
