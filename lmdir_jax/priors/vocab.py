"""Scene vocabulary for zero-shot CLIP captions (used when no captions file is given).

Short phrases in CLIP's "a photo of ..." style covering what natural-photo restoration sets show
(BSDS, DIV2K, Rain100L, SOTS, LOL...): animals, people, nature, cities, interiors, objects.
"""

from __future__ import annotations

SCENE_PHRASES: tuple[str, ...] = (
    # animals
    "a photo of a cat",
    "a photo of a dog",
    "a photo of a bird",
    "a photo of a horse",
    "a photo of cows in a field",
    "a photo of an elephant",
    "a photo of a zebra",
    "a photo of a giraffe",
    "a photo of a bear",
    "a photo of a tiger",
    "a photo of a deer",
    "a photo of fish underwater",
    "a photo of an insect on a leaf",
    "a photo of a butterfly",
    # people
    "a portrait of a person",
    "a photo of a group of people",
    "a photo of a child",
    "a photo of people on a street",
    "a photo of a person riding a bicycle",
    "a photo of an athlete playing sport",
    # nature
    "a mountain landscape",
    "a photo of snowy mountains",
    "a photo of a forest",
    "a photo of trees",
    "a photo of a field of grass",
    "a photo of flowers",
    "a close-up photo of a flower",
    "a photo of a desert",
    "a photo of a beach",
    "a photo of the sea",
    "a photo of a lake",
    "a photo of a river",
    "a photo of a waterfall",
    "a photo of the sky and clouds",
    "a photo of a sunset",
    "a photo of rocks and stones",
    "a photo of a cave",
    "a photo of a canyon",
    "a photo of a garden",
    "a photo of a park",
    # cities and buildings
    "a city street",
    "a photo of a city skyline",
    "a photo of a building",
    "a photo of a house",
    "a photo of a church",
    "a photo of a castle",
    "a photo of a temple",
    "a photo of a bridge",
    "a photo of a tower",
    "a photo of a village",
    "a photo of a road",
    "a photo of a highway with cars",
    "a photo of a harbor with boats",
    "a photo of a city at night",
    "a photo of old ruins",
    "a photo of a statue",
    # vehicles
    "a photo of a car",
    "a photo of a bus",
    "a photo of a train",
    "a photo of a boat",
    "a photo of an airplane",
    "a photo of a motorcycle",
    # interiors and objects
    "a photo of a room",
    "a photo of a kitchen",
    "a photo of a living room",
    "a photo of an office",
    "a photo of a restaurant",
    "a photo of a shop",
    "a photo of food on a plate",
    "a photo of fruit",
    "a photo of vegetables",
    "a photo of a table with objects",
    "a photo of furniture",
    "a photo of books",
    "a photo of toys",
    "a photo of a window",
    "a photo of a door",
    "a photo of text and signs",
    "a photo of a painting",
    "a photo of a pattern or texture",
    "a photo of a wall",
    "a photo of a fence",
    "a photo of an aerial view",
)


def scene_phrases() -> list[str]:
    """The scene vocabulary as a list (stable order: the index is part of cache reproducibility)."""
    return list(SCENE_PHRASES)
