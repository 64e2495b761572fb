"""Dataset constants as data: band names, per-band statistics, class names and label mappings.

BigEarthNet-Landsat (BEN-L): 7-band Landsat 8 Collection 2 Level-2 surface reflectance chips
(``SR_B1``..``SR_B7``, uint16 digital numbers) with the BigEarthNet-S2 v1 labels (43 CORINE
classes, or the 19-class nomenclature obtained with :attr:`BigEarthNetInfo.MATCH_LABELS`).

EuroSAT-Landsat (EuroSAT-L): 8-band chips (the 7 surface-reflectance bands plus the thermal
``ST_B10``) in 10 class folders. The model uses the first 7 bands only, so ``STATISTICS`` has 7
entries.
"""

from __future__ import annotations


class BigEarthNetInfo:
    BAND_NAMES = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"]

    # Per-band mean and standard deviation of the BEN-L training set, in digital numbers.
    STATISTICS = {
        "mean": [9405.194, 9649.677, 10425.686, 10444.589, 16067.627, 12699.184, 10596.475],
        "std": [6016.344, 6095.472, 5839.462, 6068.493, 6271.440, 4256.046, 3130.776],
    }

    CLASSES = {
        43: [
            "Continuous urban fabric",
            "Discontinuous urban fabric",
            "Industrial or commercial units",
            "Road and rail networks and associated land",
            "Port areas",
            "Airports",
            "Mineral extraction sites",
            "Dump sites",
            "Construction sites",
            "Green urban areas",
            "Sport and leisure facilities",
            "Non-irrigated arable land",
            "Permanently irrigated land",
            "Rice fields",
            "Vineyards",
            "Fruit trees and berry plantations",
            "Olive groves",
            "Pastures",
            "Annual crops associated with permanent crops",
            "Complex cultivation patterns",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
            "Agro-forestry areas",
            "Broad-leaved forest",
            "Coniferous forest",
            "Mixed forest",
            "Natural grassland",
            "Moors and heathland",
            "Sclerophyllous vegetation",
            "Transitional woodland/shrub",
            "Beaches, dunes, sands",
            "Bare rock",
            "Sparsely vegetated areas",
            "Burnt areas",
            "Inland marshes",
            "Peatbogs",
            "Salt marshes",
            "Salines",
            "Intertidal flats",
            "Water courses",
            "Water bodies",
            "Coastal lagoons",
            "Estuaries",
            "Sea and ocean",
        ],
        19: [
            "Urban fabric",
            "Industrial or commercial units",
            "Arable land",
            "Permanent crops",
            "Pastures",
            "Complex cultivation patterns",
            "Land principally occupied by agriculture, with significant areas of natural vegetation",
            "Agro-forestry areas",
            "Broad-leaved forest",
            "Coniferous forest",
            "Mixed forest",
            "Natural grassland and sparsely vegetated areas",
            "Moors, heathland and sclerophyllous vegetation",
            "Transitional woodland, shrub",
            "Beaches, dunes, sands",
            "Inland wetlands",
            "Coastal wetlands",
            "Inland waters",
            "Marine waters",
        ],
    }

    # Index in CLASSES[43] -> index in CLASSES[19] (the mapping torchgeo uses). The 43-class
    # indices absent here (road and rail, ports, airports, mines, dumps, construction sites,
    # green urban areas, sport facilities, bare rock, burnt areas, intertidal flats) have no
    # 19-class counterpart and are dropped.
    MATCH_LABELS = {
        0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6,
        21: 7, 22: 8, 23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15,
        34: 15, 35: 16, 36: 16, 38: 17, 39: 17, 40: 18, 41: 18, 42: 18,
    }


class EuroSATInfo:
    # The sorted class folder names of EuroSAT(-L).
    CLASSES = [
        "AnnualCrop",
        "Forest",
        "HerbaceousVegetation",
        "Highway",
        "Industrial",
        "Pasture",
        "PermanentCrop",
        "Residential",
        "River",
        "SeaLake",
    ]

    # Bands stored in a EuroSAT-L GeoTIFF; the loader keeps the first 7 (drops ST_B10).
    BAND_NAMES = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "ST_B10"]

    # Per-band mean and standard deviation of the 7 surface-reflectance bands, in digital numbers.
    STATISTICS = {
        "mean": [8515.32, 8829.60, 9795.92, 9891.66, 15499.88, 13146.12, 11004.21],
        "std": [3938.76, 4057.72, 4205.96, 4434.42, 6150.64, 4923.02, 4044.07],
    }
