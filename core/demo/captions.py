"""Alt-text-like captions of the demo pool, with the noise web captions have.

Four kinds (``caption_kind`` in the ground truth):
- ``correct``: names the image's concept through one of many alt-text templates;
- ``wrong``: the same templates with another concept's name;
- ``generic``: says nothing ("IMG_2041.jpg", "untitled");
- ``spam``: advertising unrelated to the image.
Surface noise (case changes, site suffixes, typos) is added on top of every kind.
"""

from __future__ import annotations

import numpy as np

from core.demo.concepts import Concept

CAPTION_KINDS = ("correct", "wrong", "generic", "spam")
#: Probabilities of the kinds for an image that shows a concept.
CAPTION_KIND_P = (0.83, 0.08, 0.06, 0.03)

TEMPLATES = (
    "a photo of {a} {name} on a {bg} background",
    "{Title} - stock image",
    "{name}",
    "{a} {name}",
    "close-up of {a} {name}",
    "{Name} isolated on {bg} background",
    "{name} icon",
    "{Name} shape, vector illustration",
    "picture of {a} {name} on {bg}",
    "my {name} :)",
    "{Title} | Free Stock Photo",
    "{name}, {bg} backdrop, high quality",
    "the {name} symbol",
    "{colour} {shape} shape on a {bg} surface",
    "{Title} Wall Decal",
    "{shape} ({colour})",
    "{Colour} {shape} sticker",
    "simple {name} clipart",
)

GENERIC = ("IMG_{n:04d}.jpg", "image", "untitled", "DSC{n:05d}", "photo", "Screenshot {n}", "picture",
           "download ({d})", "{n}.png", "thumbnail", "img{d}", "Untitled-{d}", "unnamed", "image {n}")

SPAM = ("BUY NOW cheap deals click here", "best price free shipping!!!", "Click here to WIN a free phone",
        "casino bonus 100% sign up today", "SALE SALE SALE 70% off everything", "cheap watches replica online",
        "Get rich fast - work from home", "limited offer!!! order today", "free download full version crack",
        "lose weight fast with this one trick")

SUFFIXES = (" - Pinterest", " | Etsy", " - Wikipedia", " stock photos", " (2019)", " - YouTube", " jpg", "...")


def _fill_template(template: str, concept: Concept, bg: str) -> str:
    a = "an" if concept.name[0] in "aeiou" else "a"
    return template.format(a=a, name=concept.name, Name=concept.name.capitalize(), Title=concept.name.title(),
                           colour=concept.colour, Colour=concept.colour.capitalize(), shape=concept.shape,
                           bg=bg)


def _typo(text: str, rng: np.random.Generator) -> str:
    """Swap two adjacent letters of one random word longer than three letters."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if not long:
        return text
    i = long[int(rng.integers(len(long)))]
    w = words[i]
    j = int(rng.integers(len(w) - 1))
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def _surface_noise(text: str, rng: np.random.Generator) -> str:
    u = rng.random(4)
    if u[0] < 0.12:
        text = text.lower()
    elif u[0] < 0.16:
        text = text.upper()
    if u[1] < 0.15:
        text += SUFFIXES[int(rng.integers(len(SUFFIXES)))]
    if u[2] < 0.03:
        text = _typo(text, rng)
    if u[3] < 0.05:
        text = "  " + text + " "
    return text


def make_caption(rng: np.random.Generator, kind: str, concept: Concept | None, bg: str,
                 concepts: list[Concept]) -> str:
    """One caption of ``kind`` for an image of ``concept`` (None for junk) on background ``bg``.

    A ``wrong`` caption names a concept other than ``concept``, drawn uniformly from ``concepts``.
    """
    if kind == "correct" or kind == "wrong":
        if concept is None:
            raise ValueError(f"a {kind} caption needs a concept")
        named = concept
        if kind == "wrong":
            others = [c for c in concepts if c.index != concept.index]
            named = others[int(rng.integers(len(others)))]
        text = _fill_template(TEMPLATES[int(rng.integers(len(TEMPLATES)))], named, bg)
    elif kind == "generic":
        text = GENERIC[int(rng.integers(len(GENERIC)))].format(n=int(rng.integers(10000)), d=int(rng.integers(1, 9)))
        return text  # file-name-like captions keep their exact form
    elif kind == "spam":
        text = SPAM[int(rng.integers(len(SPAM)))]
    else:
        raise ValueError(f"unknown caption kind {kind!r}; known: {', '.join(CAPTION_KINDS)}")
    return _surface_noise(text, rng)
