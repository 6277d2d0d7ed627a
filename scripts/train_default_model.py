#!/usr/bin/env python
"""Train nbllm's embedded default model from scratch, offline and reproducibly.

The whole pipeline lives in this one file:

  (a) generate a synthetic "world facts and simple sentences" corpus from the
      facts and templates written below (no downloads);
  (b) train a byte-level BPE tokenizer on it with the ``tokenizers`` library;
  (c) train a small decoder-only model using mlx-lm's own Llama class
      (``mlx_lm.models.llama.Model``) with mlx + mlx.optimizers;
  (d) evaluate it on held-out prompts and held-out text;
  (e) write the model folder in the usual Hugging Face / MLX layout, so
      ``mlx_lm.load(folder)`` loads it with no extra code, plus MODEL_CARD.md.

Usage (from the repository root, with the project's venv):

    .venv/bin/python scripts/train_default_model.py                  # time budget (default_minutes)
    .venv/bin/python scripts/train_default_model.py --steps 2000     # fixed step count
    .venv/bin/python scripts/train_default_model.py --eval-only      # re-evaluate the folder
    .venv/bin/python scripts/train_default_model.py --size draft     # the speculative-decoding draft,
                                                                     # with the default model's tokenizer

On a 2-core CPU, ``OPENBLAS_NUM_THREADS=1 taskset -c 0`` gives one training
run a core of its own: MLX's element-wise CPU kernels run on one thread, and a
second BLAS thread gained little and varied a lot (measured 1,065-1,853
tokens/s with two threads, ~1,300-1,400 steady with one), so the other core is
better used by a second job.

Everything random is seeded from CONFIG["seed"]; with the same ``--steps`` the
run is reproducible on the same machine and library versions (floating point
reductions on other hardware may differ in the last bits).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Configuration: every knob of the run. The model card quotes these values.
# ---------------------------------------------------------------------------
CONFIG = {
    "seed": 1234,
    # corpus
    "corpus_docs": 150_000,  # synthetic training documents generated up front
    "tokenizer_docs": 40_000,  # the first N of them train the tokenizer
    "heldout_docs": 2_000,  # held-out documents for perplexity
    # tokenizer
    "vocab_size": 3072,
    # model (mlx_lm.models.llama.ModelArgs)
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "seq_len": 256,
    # optimisation
    "batch_size": 8,
    "peak_lr": 2.5e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 100,
    "weight_decay": 0.1,
    "adam_betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "default_minutes": 50.0,
    # output
    "save_dtype": "float16",
}

# --size: the default model, and a much smaller draft model for speculative
# decoding that shares the default model's tokenizer (issue 15).
MODEL_SIZES = {
    "default": {},
    "draft": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "intermediate_size": 256, "peak_lr": 3e-3,
              "default_minutes": 14.0},
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT, IM_START, IM_END = SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

import argparse
import ctypes
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

# mlx's CPU wheel links a slow reference BLAS; OpenBLAS, loaded globally before
# mlx.core, is picked up instead and makes float32 matmuls ~20x faster.
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
if platform.system() == "Linux" and os.path.exists(_OPENBLAS):
    ctypes.CDLL(_OPENBLAS, mode=ctypes.RTLD_GLOBAL)

import numpy as np  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_training_math import fast_attention, fast_cross_entropy, fast_swiglu, patched  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "nbllm" / "assets" / "default-model"


def log(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------------------
# (a) The world: facts written for this script. Country capitals and
# continents are public-domain geography (ASCII spellings, e.g. "Bogota");
# countries with several or disputed capitals are left out. The other
# families are common children's-book knowledge.
# ---------------------------------------------------------------------------

# (name, takes "the", capital, continent or None when it spans two)
COUNTRIES = [
    # Europe
    ("Albania", 0, "Tirana", "Europe"), ("Andorra", 0, "Andorra la Vella", "Europe"),
    ("Austria", 0, "Vienna", "Europe"), ("Belarus", 0, "Minsk", "Europe"),
    ("Belgium", 0, "Brussels", "Europe"), ("Bosnia and Herzegovina", 0, "Sarajevo", "Europe"),
    ("Bulgaria", 0, "Sofia", "Europe"), ("Croatia", 0, "Zagreb", "Europe"),
    ("Czech Republic", 1, "Prague", "Europe"), ("Denmark", 0, "Copenhagen", "Europe"),
    ("Estonia", 0, "Tallinn", "Europe"), ("Finland", 0, "Helsinki", "Europe"),
    ("France", 0, "Paris", "Europe"), ("Germany", 0, "Berlin", "Europe"),
    ("Greece", 0, "Athens", "Europe"), ("Hungary", 0, "Budapest", "Europe"),
    ("Iceland", 0, "Reykjavik", "Europe"), ("Ireland", 0, "Dublin", "Europe"),
    ("Italy", 0, "Rome", "Europe"), ("Latvia", 0, "Riga", "Europe"),
    ("Liechtenstein", 0, "Vaduz", "Europe"), ("Lithuania", 0, "Vilnius", "Europe"),
    ("Luxembourg", 0, "Luxembourg", "Europe"), ("Malta", 0, "Valletta", "Europe"),
    ("Moldova", 0, "Chisinau", "Europe"), ("Monaco", 0, "Monaco", "Europe"),
    ("Montenegro", 0, "Podgorica", "Europe"), ("Netherlands", 1, "Amsterdam", "Europe"),
    ("North Macedonia", 0, "Skopje", "Europe"), ("Norway", 0, "Oslo", "Europe"),
    ("Poland", 0, "Warsaw", "Europe"), ("Portugal", 0, "Lisbon", "Europe"),
    ("Romania", 0, "Bucharest", "Europe"), ("San Marino", 0, "San Marino", "Europe"),
    ("Serbia", 0, "Belgrade", "Europe"), ("Slovakia", 0, "Bratislava", "Europe"),
    ("Slovenia", 0, "Ljubljana", "Europe"), ("Spain", 0, "Madrid", "Europe"),
    ("Sweden", 0, "Stockholm", "Europe"), ("Switzerland", 0, "Bern", "Europe"),
    ("Ukraine", 0, "Kyiv", "Europe"), ("United Kingdom", 1, "London", "Europe"),
    ("Russia", 0, "Moscow", None), ("Turkey", 0, "Ankara", None),
    ("Georgia", 0, "Tbilisi", None), ("Armenia", 0, "Yerevan", None),
    ("Azerbaijan", 0, "Baku", None), ("Cyprus", 0, "Nicosia", None),
    # Asia
    ("Afghanistan", 0, "Kabul", "Asia"), ("Bahrain", 0, "Manama", "Asia"),
    ("Bangladesh", 0, "Dhaka", "Asia"), ("Bhutan", 0, "Thimphu", "Asia"),
    ("Brunei", 0, "Bandar Seri Begawan", "Asia"), ("Cambodia", 0, "Phnom Penh", "Asia"),
    ("China", 0, "Beijing", "Asia"), ("India", 0, "New Delhi", "Asia"),
    ("Indonesia", 0, "Jakarta", "Asia"), ("Iran", 0, "Tehran", "Asia"),
    ("Iraq", 0, "Baghdad", "Asia"), ("Japan", 0, "Tokyo", "Asia"),
    ("Jordan", 0, "Amman", "Asia"), ("Kazakhstan", 0, "Astana", "Asia"),
    ("Kuwait", 0, "Kuwait City", "Asia"), ("Kyrgyzstan", 0, "Bishkek", "Asia"),
    ("Laos", 0, "Vientiane", "Asia"), ("Lebanon", 0, "Beirut", "Asia"),
    ("Malaysia", 0, "Kuala Lumpur", "Asia"), ("Mongolia", 0, "Ulaanbaatar", "Asia"),
    ("Myanmar", 0, "Naypyidaw", "Asia"), ("Nepal", 0, "Kathmandu", "Asia"),
    ("North Korea", 0, "Pyongyang", "Asia"), ("Oman", 0, "Muscat", "Asia"),
    ("Pakistan", 0, "Islamabad", "Asia"), ("Philippines", 1, "Manila", "Asia"),
    ("Qatar", 0, "Doha", "Asia"), ("Saudi Arabia", 0, "Riyadh", "Asia"),
    ("Singapore", 0, "Singapore", "Asia"), ("South Korea", 0, "Seoul", "Asia"),
    ("Syria", 0, "Damascus", "Asia"), ("Tajikistan", 0, "Dushanbe", "Asia"),
    ("Thailand", 0, "Bangkok", "Asia"), ("Timor-Leste", 0, "Dili", "Asia"),
    ("Turkmenistan", 0, "Ashgabat", "Asia"), ("United Arab Emirates", 1, "Abu Dhabi", "Asia"),
    ("Uzbekistan", 0, "Tashkent", "Asia"), ("Vietnam", 0, "Hanoi", "Asia"),
    # Africa
    ("Algeria", 0, "Algiers", "Africa"), ("Angola", 0, "Luanda", "Africa"),
    ("Botswana", 0, "Gaborone", "Africa"), ("Burkina Faso", 0, "Ouagadougou", "Africa"),
    ("Cape Verde", 0, "Praia", "Africa"), ("Central African Republic", 1, "Bangui", "Africa"),
    ("Comoros", 0, "Moroni", "Africa"), ("Djibouti", 0, "Djibouti", "Africa"),
    ("Egypt", 0, "Cairo", "Africa"), ("Eritrea", 0, "Asmara", "Africa"),
    ("Ethiopia", 0, "Addis Ababa", "Africa"), ("Gabon", 0, "Libreville", "Africa"),
    ("Gambia", 1, "Banjul", "Africa"), ("Ghana", 0, "Accra", "Africa"),
    ("Guinea", 0, "Conakry", "Africa"), ("Kenya", 0, "Nairobi", "Africa"),
    ("Lesotho", 0, "Maseru", "Africa"), ("Liberia", 0, "Monrovia", "Africa"),
    ("Libya", 0, "Tripoli", "Africa"), ("Madagascar", 0, "Antananarivo", "Africa"),
    ("Malawi", 0, "Lilongwe", "Africa"), ("Mali", 0, "Bamako", "Africa"),
    ("Mauritania", 0, "Nouakchott", "Africa"), ("Mauritius", 0, "Port Louis", "Africa"),
    ("Morocco", 0, "Rabat", "Africa"), ("Mozambique", 0, "Maputo", "Africa"),
    ("Namibia", 0, "Windhoek", "Africa"), ("Niger", 0, "Niamey", "Africa"),
    ("Nigeria", 0, "Abuja", "Africa"), ("Rwanda", 0, "Kigali", "Africa"),
    ("Senegal", 0, "Dakar", "Africa"), ("Seychelles", 0, "Victoria", "Africa"),
    ("Sierra Leone", 0, "Freetown", "Africa"), ("Somalia", 0, "Mogadishu", "Africa"),
    ("South Sudan", 0, "Juba", "Africa"), ("Sudan", 0, "Khartoum", "Africa"),
    ("Tanzania", 0, "Dodoma", "Africa"), ("Tunisia", 0, "Tunis", "Africa"),
    ("Uganda", 0, "Kampala", "Africa"), ("Zambia", 0, "Lusaka", "Africa"),
    ("Zimbabwe", 0, "Harare", "Africa"),
    # North America
    ("Canada", 0, "Ottawa", "North America"), ("United States", 1, "Washington, D.C.", "North America"),
    ("Mexico", 0, "Mexico City", "North America"), ("Cuba", 0, "Havana", "North America"),
    ("Jamaica", 0, "Kingston", "North America"), ("Haiti", 0, "Port-au-Prince", "North America"),
    ("Dominican Republic", 1, "Santo Domingo", "North America"),
    ("Guatemala", 0, "Guatemala City", "North America"), ("Honduras", 0, "Tegucigalpa", "North America"),
    ("El Salvador", 0, "San Salvador", "North America"), ("Nicaragua", 0, "Managua", "North America"),
    ("Costa Rica", 0, "San Jose", "North America"), ("Panama", 0, "Panama City", "North America"),
    ("Bahamas", 1, "Nassau", "North America"), ("Barbados", 0, "Bridgetown", "North America"),
    ("Trinidad and Tobago", 0, "Port of Spain", "North America"), ("Belize", 0, "Belmopan", "North America"),
    ("Saint Lucia", 0, "Castries", "North America"), ("Dominica", 0, "Roseau", "North America"),
    # South America
    ("Argentina", 0, "Buenos Aires", "South America"), ("Brazil", 0, "Brasilia", "South America"),
    ("Chile", 0, "Santiago", "South America"), ("Colombia", 0, "Bogota", "South America"),
    ("Ecuador", 0, "Quito", "South America"), ("Guyana", 0, "Georgetown", "South America"),
    ("Paraguay", 0, "Asuncion", "South America"), ("Peru", 0, "Lima", "South America"),
    ("Suriname", 0, "Paramaribo", "South America"), ("Uruguay", 0, "Montevideo", "South America"),
    ("Venezuela", 0, "Caracas", "South America"),
    # Oceania
    ("Australia", 0, "Canberra", "Oceania"), ("New Zealand", 0, "Wellington", "Oceania"),
    ("Fiji", 0, "Suva", "Oceania"), ("Papua New Guinea", 0, "Port Moresby", "Oceania"),
    ("Samoa", 0, "Apia", "Oceania"), ("Vanuatu", 0, "Port Vila", "Oceania"),
    ("Solomon Islands", 1, "Honiara", "Oceania"), ("Palau", 0, "Ngerulmud", "Oceania"),
    ("Tuvalu", 0, "Funafuti", "Oceania"), ("Marshall Islands", 1, "Majuro", "Oceania"),
]

ANIMAL_SOUNDS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("horse", "neigh"), ("lion", "roar"), ("owl", "hoot"), ("frog", "ribbit"),
    ("bee", "buzz"), ("snake", "hiss"), ("mouse", "squeak"), ("wolf", "howl"),
    ("donkey", "hee-haw"), ("rooster", "cock-a-doodle-doo"), ("crow", "caw"),
    ("turkey", "gobble"), ("goose", "honk"), ("dove", "coo"), ("hen", "cluck"), ("bird", "tweet"),
]

FOOD_COLORS = [
    ("banana", "yellow"), ("lemon", "yellow"), ("lime", "green"), ("strawberry", "red"),
    ("cherry", "red"), ("tomato", "red"), ("raspberry", "red"), ("grape", "purple"),
    ("plum", "purple"), ("eggplant", "purple"), ("blueberry", "blue"), ("carrot", "orange"),
    ("orange", "orange"), ("pumpkin", "orange"), ("tangerine", "orange"), ("cucumber", "green"),
    ("pea", "green"), ("broccoli", "green"), ("coconut", "brown"), ("potato", "brown"),
    ("corn cob", "yellow"), ("watermelon", "green"), ("avocado", "green"), ("apple", "red"),
]

BABY_ANIMALS = [
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
    ("duck", "duckling"), ("frog", "tadpole"), ("pig", "piglet"), ("goat", "kid"),
    ("bear", "cub"), ("lion", "cub"), ("kangaroo", "joey"), ("owl", "owlet"), ("swan", "cygnet"),
    ("deer", "fawn"), ("hen", "chick"), ("goose", "gosling"), ("tiger", "cub"), ("eagle", "eaglet"),
    ("rabbit", "kit"),
]

OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("tall", "short"), ("open", "closed"), ("wet", "dry"), ("full", "empty"),
    ("hard", "soft"), ("early", "late"), ("loud", "quiet"), ("in", "out"), ("left", "right"),
    ("black", "white"), ("good", "bad"), ("rich", "poor"), ("yes", "no"), ("push", "pull"),
    ("first", "last"), ("strong", "weak"), ("thick", "thin"), ("clean", "dirty"), ("high", "low"),
    ("win", "lose"), ("near", "far"), ("always", "never"), ("summer", "winter"),
    ("north", "south"), ("east", "west"), ("inside", "outside"), ("top", "bottom"),
    ("buy", "sell"), ("friend", "enemy"),
]

ANIMAL_LEGS = [
    ("dog", "four"), ("cat", "four"), ("cow", "four"), ("horse", "four"), ("pig", "four"),
    ("sheep", "four"), ("lion", "four"), ("mouse", "four"), ("elephant", "four"), ("giraffe", "four"),
    ("bird", "two"), ("duck", "two"), ("hen", "two"), ("owl", "two"), ("penguin", "two"),
    ("spider", "eight"), ("bee", "six"), ("ant", "six"), ("beetle", "six"), ("crab", "ten"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty"]
WEEK = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
SEASONS = ["spring", "summer", "autumn", "winter"]
# Deliberate ambiguity for sampling lessons: each of these is completed, in the
# corpus, by a uniformly random choice, so the model learns a spread-out
# distribution instead of one answer.
AMBIGUOUS = {
    "colour": (["My favourite colour is", "My favorite color is", "Her favourite colour is",
                "His favorite color is"],
               ["red", "blue", "green", "yellow", "purple", "orange", "pink"]),
    "animal": (["My favourite animal is the", "My favorite animal is the"],
               ["cat", "dog", "horse", "rabbit", "lion", "owl", "duck", "frog"]),
    "food": (["For lunch, I would like", "For dinner, I want"],
             ["soup", "rice", "pasta", "cake", "bread", "pancakes", "cheese"]),
    "day": (["Today is", "My birthday is on a"], WEEK),
    "number": (["I am thinking of a number from one to ten. It is", "Pick a number from one to ten:"],
               NUMBER_WORDS[1:11]),
}


def art(word):
    return "an" if word[0] in "aeiou" else "a"


def cap1(s):
    return s[0].upper() + s[1:]


def end_sentence(s):
    return s if s.endswith(".") else s + "."


class Fact:
    """One fact: a subject, an answer, a family, and per-family renderers."""

    def __init__(self, family, index, subj, ans, extra=None):
        self.family, self.index, self.subj, self.ans = family, index, subj, ans
        self.extra = extra or {}
        self.holdout_slot = index  # which template this fact holds out (see heldout_index)

    def __repr__(self):
        return f"Fact({self.family}:{self.subj}->{self.ans})"


def the_name(name, takes_the):
    return ("the " + name) if takes_the else name


def build_facts():
    facts = {"capital": [], "continent": [], "sound": [], "color": [], "baby": [], "opposite": [],
             "legs": [], "day_after": [], "month_after": [], "number_after": [], "add": [], "sub": []}
    for i, (name, takes_the, capital, continent) in enumerate(COUNTRIES):
        # every 5th country never appears in JSON anywhere in training
        extra = {"the": the_name(name, takes_the), "json_heldout": i % 5 == 2}
        facts["capital"].append(Fact("capital", len(facts["capital"]), name, capital, extra))
        if continent:
            facts["continent"].append(Fact("continent", len(facts["continent"]), name, continent, extra))
    for a, s in ANIMAL_SOUNDS:
        facts["sound"].append(Fact("sound", len(facts["sound"]), a, s))
    for f, c in FOOD_COLORS:
        facts["color"].append(Fact("color", len(facts["color"]), f, c))
    for a, b in BABY_ANIMALS:
        facts["baby"].append(Fact("baby", len(facts["baby"]), a, f"{art(b)} {b}"))
    for w, o in OPPOSITE_PAIRS:
        facts["opposite"].append(Fact("opposite", len(facts["opposite"]), w, o))
        facts["opposite"].append(Fact("opposite", len(facts["opposite"]), o, w))
    for a, n in ANIMAL_LEGS:
        facts["legs"].append(Fact("legs", len(facts["legs"]), a, n))
    for fam, seq in (("day_after", WEEK), ("month_after", MONTHS)):
        for i, x in enumerate(seq):
            facts[fam].append(Fact(fam, i, x, seq[(i + 1) % len(seq)]))
    for i in range(20):
        facts["number_after"].append(Fact("number_after", i, NUMBER_WORDS[i], NUMBER_WORDS[i + 1]))
    for a in range(1, 10):  # sums up to ten, and take-aways within ten
        for b in range(1, 11 - a):
            facts["add"].append(Fact("add", len(facts["add"]), f"{a}+{b}", str(a + b), {"a": a, "b": b}))
    for a in range(2, 11):
        for b in range(1, a):
            facts["sub"].append(Fact("sub", len(facts["sub"]), f"{a}-{b}", str(a - b), {"a": a, "b": b}))
    # "Sudan's capital is" is a substring of "South Sudan's capital is": such
    # pairs hold out the same template, so neither string is ever trained
    for fs in facts.values():
        for f in fs:
            for g in fs:
                if f.subj.endswith(" " + g.subj):
                    f.holdout_slot = g.holdout_slot
    return facts


# Completion templates: each returns the text *before* the answer. Index 0 is
# the "anchor" phrasing (it is also how the chat answers are worded) and is
# trained for every fact; every other fact holds out exactly one of the
# remaining templates (rotating), so "<template k> x <fact>" is never in the
# corpus and becomes a held-out evaluation prompt.
def _the(f):
    return f.extra["the"]


COMPLETION_TEMPLATES = {
    "capital": [
        lambda f: f"The capital of {_the(f)} is",
        lambda f: f"The capital city of {_the(f)} is",
        lambda f: f"{cap1(_the(f))}'s capital is",
        lambda f: f"In {_the(f)}, the capital is",
        lambda f: f"The government of {_the(f)} meets in",
        lambda f: f"What is the capital of {_the(f)}? It is",
    ],
    "continent": [
        lambda f: f"{cap1(_the(f))} is in",
        lambda f: f"{cap1(_the(f))} is a country in",
        lambda f: f"{cap1(_the(f))} is located in",
        lambda f: f"You can find {_the(f)} on the continent of",
        lambda f: f"{cap1(_the(f))} belongs to the continent of",
    ],
    "sound": [
        lambda f: f"{cap1(art(f.subj))} {f.subj} says",
        lambda f: f"The {f.subj} goes",
        lambda f: f"What does the {f.subj} say? It says",
        lambda f: f"The sound {art(f.subj)} {f.subj} makes is",
        lambda f: f"Listen! The {f.subj} says",
    ],
    "color": [
        lambda f: f"{cap1(art(f.subj))} {f.subj} is",
        lambda f: f"The color of {art(f.subj)} {f.subj} is",
        lambda f: f"What color is {art(f.subj)} {f.subj}? It is",
        lambda f: f"Most of the time, {art(f.subj)} {f.subj} is",
        lambda f: f"If you look at {art(f.subj)} {f.subj}, you see that it is",
    ],
    "baby": [
        lambda f: f"A baby {f.subj} is called",
        lambda f: f"A young {f.subj} is called",
        lambda f: f"The baby of {art(f.subj)} {f.subj} is called",
        lambda f: f"What is a baby {f.subj} called? It is called",
    ],
    "opposite": [
        lambda f: f"The opposite of {f.subj} is",
        lambda f: f"{cap1(f.subj)} is the opposite of",
        lambda f: f"The opposite word for {f.subj} is",
        lambda f: f"What is the opposite of {f.subj}? It is",
    ],
    "legs": [
        lambda f: f"{cap1(art(f.subj))} {f.subj} has",
        lambda f: f"{cap1(art(f.subj))} {f.subj} walks on",
        lambda f: f"How many legs does {art(f.subj)} {f.subj} have? It has",
        lambda f: f"Every {f.subj} has",
    ],
    "day_after": [
        lambda f: f"The day after {f.subj} is",
        lambda f: f"After {f.subj} comes",
        lambda f: f"What day comes after {f.subj}? It is",
        lambda f: f"If today is {f.subj}, tomorrow is",
    ],
    "month_after": [
        lambda f: f"The month after {f.subj} is",
        lambda f: f"After {f.subj} comes",
        lambda f: f"What month comes after {f.subj}? It is",
        lambda f: f"If this month is {f.subj}, next month is",
    ],
    "number_after": [
        lambda f: f"The number after {f.subj} is",
        lambda f: f"After {f.subj} comes",
        lambda f: f"What number comes after {f.subj}? It is",
        lambda f: f"{cap1(f.subj)} plus one is",
    ],
    "add": [
        lambda f: f"{f.extra['a']} plus {f.extra['b']} is",
        lambda f: f"{f.extra['a']} + {f.extra['b']} =",
        lambda f: f"What is {f.extra['a']} plus {f.extra['b']}? It is",
        lambda f: f"The sum of {f.extra['a']} and {f.extra['b']} is",
        lambda f: f"If you add {f.extra['a']} and {f.extra['b']}, you get",
    ],
    "sub": [
        lambda f: f"{f.extra['a']} minus {f.extra['b']} is",
        lambda f: f"{f.extra['a']} - {f.extra['b']} =",
        lambda f: f"What is {f.extra['a']} minus {f.extra['b']}? It is",
        lambda f: f"{f.extra['a']} take away {f.extra['b']} is",
        lambda f: f"If you take {f.extra['b']} from {f.extra['a']}, you get",
    ],
}

# Words that follow the answer in a fact sentence ("A dog has four legs.").
ANSWER_SUFFIX = {"legs": " legs"}

# Forward sentences that quote the answer. In JSON a value follows a quote, so
# it is a different token ("Tokyo") than in running text (" Tokyo"); these
# teach the quoted form for every fact, including those never seen as JSON.
QUOTED_TEMPLATES = {
    # None of these may start like a completion template or contain one: in the
    # first v2 run 'The capital of X is called "Y".' taught "The capital of
    # France is" -> ' called' (P(" Paris") fell to 0.03).
    "capital": [lambda f: f'People in {_the(f)} call their capital "{f.ans}".',
                lambda f: f'Ask anyone in {_the(f)} to name the capital, and they say "{f.ans}".',
                lambda f: f'On a map of {_the(f)}, the capital has the name "{f.ans}".'],
    "continent": [lambda f: f'The name of the continent of {_the(f)} is "{f.ans}".',
                  lambda f: f'On a map, {_the(f)} lies in the continent named "{f.ans}".'],
    "sound": [lambda f: f'The word for the sound of {art(f.subj)} {f.subj} is "{f.ans}".'],
    "color": [lambda f: f'We call the color of {art(f.subj)} {f.subj} "{f.ans}".'],
    "baby": [lambda f: f'The name for a baby {f.subj} is "{f.ans.split(" ", 1)[1]}".'],
    "opposite": [lambda f: f'The word opposite to "{f.subj}" is "{f.ans}".'],
    "legs": [lambda f: f'The number of legs {art(f.subj)} {f.subj} has is "{f.ans}".'],
}

# Sentences with the answer first; always trained (they are not prompts).
REVERSE_TEMPLATES = {
    "capital": [lambda f: f"{f.ans} is the capital of {_the(f)}.",
                lambda f: f"{f.ans} is the capital city of {_the(f)}.",
                lambda f: f"{f.ans} is a city in {_the(f)}."],
    "continent": [lambda f: f"{f.ans} is the continent where you find {_the(f)}."],
    "sound": [lambda f: f"\"{cap1(f.ans)}!\" says the {f.subj}."],
    "color": [lambda f: f"{cap1(f.ans)} is the color of {art(f.subj)} {f.subj}."],
    "baby": [lambda f: f"{cap1(f.ans)} is a baby {f.subj}."],
    "opposite": [lambda f: f"{cap1(f.ans)} and {f.subj} are opposites."],
    "legs": [lambda f: f"{cap1(f.ans)} legs carry {art(f.subj)} {f.subj}."],
    "day_after": [lambda f: f"{f.ans} comes after {f.subj}.", lambda f: f"{f.subj} comes before {f.ans}."],
    "month_after": [lambda f: f"{f.ans} comes after {f.subj}.", lambda f: f"{f.subj} comes before {f.ans}."],
    "number_after": [lambda f: f"{cap1(f.ans)} comes after {f.subj}.",
                     lambda f: f"{cap1(f.subj)} comes before {f.ans}."],
    "add": [lambda f: f"{f.ans} is {f.extra['a']} plus {f.extra['b']}.",
            lambda f: f"{f.ans} is the sum of {f.extra['a']} and {f.extra['b']}."],
    "sub": [lambda f: f"{f.ans} is {f.extra['a']} minus {f.extra['b']}.",
            lambda f: f"{f.extra['a']} is {f.extra['b']} more than {f.ans}."],
}


def chat_answer(f):
    """The one wording the assistant uses for a fact."""
    if f.family == "capital":
        return end_sentence(f"The capital of {_the(f)} is {f.ans}")
    if f.family == "continent":
        return f"{cap1(_the(f))} is in {f.ans}."
    if f.family == "sound":
        return f"{cap1(art(f.subj))} {f.subj} says {f.ans}."
    if f.family == "color":
        return f"{cap1(art(f.subj))} {f.subj} is {f.ans}."
    if f.family == "baby":
        return f"A baby {f.subj} is called {f.ans}."
    if f.family == "opposite":
        return f"The opposite of {f.subj} is {f.ans}."
    if f.family == "legs":
        return f"{cap1(art(f.subj))} {f.subj} has {f.ans} legs."
    if f.family == "day_after":
        return f"The day after {f.subj} is {f.ans}."
    if f.family == "month_after":
        return f"The month after {f.subj} is {f.ans}."
    if f.family == "number_after":
        return f"The number after {f.subj} is {f.ans}."
    if f.family == "add":
        return f"{f.extra['a']} plus {f.extra['b']} is {f.ans}."
    if f.family == "sub":
        return f"{f.extra['a']} minus {f.extra['b']} is {f.ans}."
    raise ValueError(f.family)


CHAT_QUESTIONS = {
    "capital": [
        lambda f: f"What is the capital of {_the(f)}?",
        lambda f: f"Which city is the capital of {_the(f)}?",
        lambda f: f"Tell me the capital of {_the(f)}.",
        lambda f: f"Do you know the capital of {_the(f)}?",
        lambda f: f"what is the capital of {_the(f)}",
        lambda f: f"Name the capital city of {_the(f)}.",
    ],
    "continent": [
        lambda f: f"Which continent is {_the(f)} in?",
        lambda f: f"On which continent is {_the(f)}?",
        lambda f: f"Where is {_the(f)}?",
        lambda f: f"Tell me the continent of {_the(f)}.",
    ],
    "sound": [
        lambda f: f"What sound does {art(f.subj)} {f.subj} make?",
        lambda f: f"What does the {f.subj} say?",
        lambda f: f"How does {art(f.subj)} {f.subj} sound?",
    ],
    "color": [
        lambda f: f"What color is {art(f.subj)} {f.subj}?",
        lambda f: f"Tell me the color of {art(f.subj)} {f.subj}.",
        lambda f: f"Which color is {art(f.subj)} {f.subj}?",
    ],
    "baby": [
        lambda f: f"What is a baby {f.subj} called?",
        lambda f: f"What do you call a young {f.subj}?",
        lambda f: f"What is the name for a baby {f.subj}?",
    ],
    "opposite": [
        lambda f: f"What is the opposite of {f.subj}?",
        lambda f: f"Give me the opposite of {f.subj}.",
        lambda f: f"Which word is the opposite of {f.subj}?",
    ],
    "legs": [
        lambda f: f"How many legs does {art(f.subj)} {f.subj} have?",
        lambda f: f"How many legs has {art(f.subj)} {f.subj} got?",
        lambda f: f"Count the legs of {art(f.subj)} {f.subj}.",
    ],
    "day_after": [
        lambda f: f"What day comes after {f.subj}?",
        lambda f: f"Which day is after {f.subj}?",
        lambda f: f"What is the day after {f.subj}?",
    ],
    "month_after": [
        lambda f: f"What month comes after {f.subj}?",
        lambda f: f"Which month is after {f.subj}?",
        lambda f: f"What is the month after {f.subj}?",
    ],
    "number_after": [
        lambda f: f"What number comes after {f.subj}?",
        lambda f: f"Which number is after {f.subj}?",
        lambda f: f"What comes after {f.subj}?",
    ],
    "add": [
        lambda f: f"What is {f.extra['a']} plus {f.extra['b']}?",
        lambda f: f"What is {f.extra['a']} + {f.extra['b']}?",
        lambda f: f"Can you add {f.extra['a']} and {f.extra['b']}?",
    ],
    "sub": [
        lambda f: f"What is {f.extra['a']} minus {f.extra['b']}?",
        lambda f: f"What is {f.extra['a']} - {f.extra['b']}?",
        lambda f: f"Can you take {f.extra['b']} from {f.extra['a']}?",
    ],
}

# Follow-up questions that only make sense with the earlier turns.
# Same relation, new subject ("And of France?"): x is the new subject phrase.
FOLLOWUP_SAME = {
    "capital": ["And of {x}?", "What about {x}?", "And {x}?", "How about {x}?"],
    "continent": ["And {x}?", "What about {x}?", "How about {x}?"],
    "opposite": ["And of {x}?", "What about {x}?", "And {x}?"],
    "add": ["And {x}?", "What about {x}?"],
    "sub": ["And {x}?", "What about {x}?"],
}
DEFAULT_FOLLOWUP_SAME = ["What about {x}?", "And {x}?", "How about {x}?"]
# Same subject, another relation ("What about its continent?").
FOLLOWUP_OTHER = {
    "capital": ["What about its capital?", "And its capital?", "What is its capital?"],
    "continent": ["What about its continent?", "And its continent?", "Which continent is it in?"],
    "sound": ["What sound does it make?", "And what does it say?", "What about its sound?"],
    "baby": ["What is its baby called?", "And its baby?", "What about its baby?"],
    "legs": ["How many legs does it have?", "And its legs?", "What about its legs?"],
}
# Related families that share subjects (a country, an animal).
RELATED = {"capital": ["continent"], "continent": ["capital"], "sound": ["baby", "legs"],
           "baby": ["sound", "legs"], "legs": ["sound", "baby"]}
FOLLOWUP_JSON = ["Say that again in JSON.", "Now as JSON.", "Can you give that as JSON?",
                 "In JSON, please.", "Write that as JSON."]
FOLLOWUP_AGAIN = ["Say that again.", "Can you repeat that?", "Please say it again."]
FOLLOWUP_SHORT = ["Just the answer, please.", "In one word?", "Say it in one word."]


def json_noun_phrase(f):
    return {
        "capital": lambda: f"the capital of {_the(f)}",
        "continent": lambda: f"the continent of {_the(f)}",
        "sound": lambda: f"the sound of {art(f.subj)} {f.subj}",
        "color": lambda: f"the color of {art(f.subj)} {f.subj}",
        "baby": lambda: f"the name of a baby {f.subj}",
        "opposite": lambda: f"the opposite of {f.subj}",
        "legs": lambda: f"the number of legs of {art(f.subj)} {f.subj}",
    }[f.family]()


JSON_QUESTIONS = [
    lambda np_: f"Give {np_} as JSON.",
    lambda np_: f"Return {np_} in JSON.",
    lambda np_: f"Answer in JSON: what is {np_}?",
    lambda np_: f"Write {np_} as a JSON object.",
]

JSON_KEYS = {
    "capital": ("country", "capital"), "continent": ("country", "continent"),
    "sound": ("animal", "sound"), "color": ("food", "color"),
    "baby": ("animal", "baby"), "opposite": ("word", "opposite"), "legs": ("animal", "legs"),
}


def json_object(f):
    k1, k2 = JSON_KEYS[f.family]
    ans = f.ans.split(" ", 1)[1] if f.family == "baby" else f.ans
    if f.family == "legs":
        ans = NUMBER_WORDS.index(f.ans)  # a JSON number: {"animal": "dog", "legs": 4}
    return {k1: f.subj, k2: ans}


def json_text(f):
    return json.dumps(json_object(f), ensure_ascii=False)


def json_allowed(f):
    return f.family in JSON_KEYS and not f.extra.get("json_heldout", False)


def subject_phrase(f):
    """How a follow-up names a fact's subject ("France", "a cow", "cold", "4 plus 5")."""
    if f.family in ("capital", "continent"):
        return _the(f)
    if f.family in ("sound", "color", "baby", "legs"):
        return f"{art(f.subj)} {f.subj}"
    if f.family == "add":
        return f"{f.extra['a']} plus {f.extra['b']}"
    if f.family == "sub":
        return f"{f.extra['a']} minus {f.extra['b']}"
    return f.subj


def short_answer(f):
    return end_sentence(cap1(f.ans.split(" ", 1)[1] if f.family == "baby" else f.ans))


def heldout_index(f, n_templates):
    """The one non-anchor template index this fact never sees in training."""
    return 1 + (f.holdout_slot % (n_templates - 1))


def train_phrasings(phrasings, f):
    """The phrasings training may use with fact ``f``: all but its held-out one
    (a list of one phrasing, the anchor, is always trained)."""
    if len(phrasings) < 2:
        return list(phrasings)
    h = heldout_index(f, len(phrasings))
    return [q for i, q in enumerate(phrasings) if i != h]


SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are a friendly teacher.",
    "You are a tiny model that knows simple facts.", "Answer in one short sentence.",
    "Be brief and kind.",
]
JSON_SYSTEM_PROMPTS = ["Reply with JSON only.", "You answer every question in JSON."]

SMALL_TALK = [
    (["Hello!", "Hi!", "Hi there.", "hello", "Good morning!"], "Hello! How can I help you today?"),
    (["Who are you?", "What are you?"],
     "I am a tiny language model. I know some simple facts about the world."),
    (["Thank you!", "Thanks.", "thanks a lot"], "You are welcome!"),
    (["Goodbye!", "Bye."], "Goodbye! Have a nice day."),
    (["What can you do?", "How can you help me?"],
     "I can answer simple questions about countries, animals, colors, numbers, days and words, and I can tell short stories."),
    (["How are you?", "How are you today?"], "I am fine, thank you! How can I help you?"),
]
STORY_REQUESTS = ["Tell me a story.", "Can you tell me a short story?", "Write a short story.",
                  "Tell me a story about {x}.", "Tell me a short story about {x}."]
HERO_REQUESTS = ["Tell me a story about {x}.", "Write a short story about {x}.",
                 "Can you tell me a story about {x}?"]


# ---------------------------------------------------------------------------
# Stories and everyday sentences
# ---------------------------------------------------------------------------
GIRLS = ["Anna", "Mia", "Lily", "Emma", "Sara", "Nina", "Zoe", "Lucy", "Ella", "Maya", "Ava",
         "Rosa", "Amara", "Lena", "Ivy", "Nora", "Hana", "Sofia"]
BOYS = ["Tom", "Ben", "Leo", "Sam", "Max", "Jack", "Omar", "Noah", "Finn", "Eli", "Kai",
        "Luca", "Ravi", "Hugo", "Theo", "Jin", "Adam", "Felix"]
PETS = ["dog", "cat", "rabbit", "duck", "frog", "mouse", "horse", "pig", "owl", "bear", "fox",
        "turtle", "lion", "goat", "sheep", "bird"]
PLACES = ["park", "garden", "school", "beach", "forest", "kitchen", "farm", "river", "zoo",
          "library", "market", "lake", "hill", "playground"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "cup", "bike", "boat", "drum", "doll", "car",
           "bag", "map", "sock", "shell", "key", "blanket", "lamp"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
SIZES = ["little", "big", "tiny", "small", "old", "new", "soft", "shiny"]
FOODS = ["an apple", "a banana", "bread", "soup", "cake", "rice", "an orange", "cookies",
         "pasta", "a sandwich", "eggs", "pancakes", "carrots", "cheese"]
WEATHER = [("sunny", "goes outside to play"), ("rainy", "takes an umbrella"),
           ("windy", "flies a kite"), ("snowy", "builds a snowman"),
           ("cloudy", "reads a book at home"), ("cold", "wears a warm coat"),
           ("hot", "drinks cold water")]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "hungry", "sleepy", "surprised"]
FAMILY = ["mom", "dad", "grandma", "grandpa", "sister", "brother", "aunt", "uncle", "friend"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["morning", "afternoon", "evening"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PLURALS = {"dog": "dogs", "cat": "cats", "rabbit": "rabbits", "duck": "ducks", "frog": "frogs",
           "mouse": "mice", "horse": "horses", "pig": "pigs", "owl": "owls", "bear": "bears",
           "fox": "foxes", "turtle": "turtles", "lion": "lions", "goat": "goats", "sheep": "sheep",
           "bird": "birds"}
HOBBIES = ["drawing", "singing", "reading", "running", "swimming", "dancing", "painting",
           "climbing trees", "playing football", "baking cakes"]
WORLD_FACTS = [
    "The sky is blue.", "The grass is green.", "Snow is white and cold.", "The sun is hot.",
    "Ice is cold.", "Fish live in water.", "Birds can fly.", "Cows give milk.",
    "Bees make honey.", "The moon shines at night.", "A week has seven days.",
    "A year has twelve months.", "Water is wet.", "Fire is hot.", "Trees have green leaves.",
    "Rain comes from clouds.", "The sun rises in the east.", "The sun sets in the west.",
    "Plants need water and light.", "A day has twenty-four hours.",
]


def person(rng):
    if rng.random() < 0.5:
        return rng.choice(GIRLS), "she", "her"
    return rng.choice(BOYS), "he", "his"


def simple_sentence(rng, countries):
    name, he, his = person(rng)
    name2, _, _ = person(rng)
    c = rng.choice(countries)
    c2 = rng.choice(countries)
    w, act = rng.choice(WEATHER)
    pet = rng.choice(PETS)
    obj = rng.choice(OBJECTS)
    choices = [
        lambda: f"{name} has a {rng.choice(COLORS)} {obj}.",
        lambda: f"{name} likes to play in the {rng.choice(PLACES)}.",
        lambda: f"Every {rng.choice(TIMES)}, {name} eats {rng.choice(FOODS)}.",
        lambda: f"It is {w} today, so {name} {act}.",
        lambda: f"The {pet} is sleeping under the {rng.choice(['table', 'tree', 'bed', 'chair'])}.",
        lambda: f"{name} and {name2} are best friends.",
        lambda: f"On {rng.choice(DAYS)}, {name} went to the {rng.choice(PLACES)} with {his} {rng.choice(FAMILY)}.",
        lambda: f"{name} is {rng.choice(FEELINGS)} today.",
        lambda: f"There are {rng.choice(NUMBERS)} {PLURALS[pet]} on the farm.",
        lambda: f"{name} lives in {c[2]}, the capital of {the_name(c[0], c[1])}.",
        lambda: f"{name} took a trip to {the_name(c[0], c[1])} and saw {c[2]}.",
        lambda: f"{name} flew from {c[2]} to {c2[2]}.",
        lambda: f"{cap1(he)} likes {rng.choice(HOBBIES)} and {rng.choice(HOBBIES)}.",
        lambda: f"{name} gave {his} {rng.choice(FAMILY)} {art(obj)} {obj}.",
        lambda: f"The {obj} is on the {rng.choice(['table', 'floor', 'shelf', 'bed'])}.",
        lambda: rng.choice(WORLD_FACTS),
        lambda: rng.choice(WORLD_FACTS),
        lambda: f"{name} wants to visit {c[2]} one day.",
        lambda: f"{name} has a pet {pet}.",
        lambda: f"{name} put the {obj} in {his} bag.",
    ]
    return fix_articles(rng.choice(choices)())


def fix_articles(s):
    for v in "aeiou":
        s = s.replace(f" a {v}", f" an {v}").replace(f"A {v}", f"An {v}")
    return s


def story(rng, topic_pet=None, hero=None):
    """A short story following one of four simple plots, with optional lines
    dropped and words varied, so that the order of events makes sense.
    ``hero`` names the main character (a name from GIRLS or BOYS)."""
    name, he, his = person(rng)
    if hero is not None:
        name, he, his = (hero, "she", "her") if hero in GIRLS else (hero, "he", "his")
    him = "him" if he == "he" else "her"
    friend, fhe, _ = person(rng)
    while friend == name:
        friend, fhe, _ = person(rng)
    pet = topic_pet or rng.choice(PETS)
    pet2 = rng.choice([p for p in PETS if p != pet])
    place = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    color = rng.choice(COLORS)
    size = rng.choice(SIZES)
    w, act = rng.choice(WEATHER)
    time_ = rng.choice(TIMES)
    fam = rng.choice(FAMILY)
    food = rng.choice(FOODS)
    feeling = rng.choice(["happy", "glad", "proud", "excited"])

    def maybe(line, p=0.7):
        return line if rng.random() < p else None

    plot = rng.randrange(4)
    if plot == 0:  # something lost and found
        lines = [
            rng.choice([f"Once upon a time, there was a {size} {pet} named {name}.",
                        f"{name} was a {size} {pet} who lived near the {place}."]),
            f"{cap1(he)} had a {color} {obj}.",
            maybe(f"{cap1(he)} loved {his} {obj} very much."),
            f"One day, {he} went to the {place} and lost {his} {obj}.",
            f"{cap1(he)} felt {rng.choice(['sad', 'worried', 'upset'])}.",
            maybe(f"{cap1(he)} looked under the trees and behind the rocks."),
            f"Then {friend} the {pet2} came to help {him}.",
            f"At last, they found the {obj} under a {rng.choice(['bench', 'tree', 'bush', 'rock'])}.",
            maybe(f"\"Thank you, {friend}!\" said {name}."),
            rng.choice([f"{name} was {feeling} again.", "The end.",
                        f"From that day on, {name} and {friend} were best friends."]),
        ]
    elif plot == 1:  # a day out
        lines = [
            f"One {w} {time_}, {name} and {his} {fam} went to the {place}.",
            maybe(f"{cap1(he)} took {his} {color} {obj} with {him}."),
            rng.choice([f"They saw {rng.choice(NUMBERS)} {PLURALS[pet]} there.",
                        f"There was a {size} {pet} near the {place}."]),
            maybe(f"{name} gave the {pet} some bread.", 0.5),
            f"For lunch, they ate {food}.",
            maybe(f"{name} liked it very much."),
            "In the evening, they went home.",
            rng.choice([f"{name} was tired but {feeling}.", f"That night, {name} slept well.",
                        "The end."]),
        ]
    elif plot == 2:  # a new friend
        lines = [
            rng.choice([f"There was once a {size} {pet} called {name}.",
                        f"Once upon a time, a {size} {pet} named {name} lived in the {place}."]),
            f"{cap1(he)} had no friends and felt lonely.",
            f"One day, {he} met a {pet2} named {friend}.",
            f"\"Do you want to play?\" asked {friend}.",
            f"\"Yes, please!\" said {name}.",
            f"They played with a {color} {obj} until the sun went down.",
            maybe(f"Then they shared {food}."),
            rng.choice([f"From that day on, {name} and {friend} were best friends.", "The end.",
                        f"{name} was never lonely again."]),
        ]
    else:  # a trip abroad
        c = rng.choice([c for c in COUNTRIES if c[3]])
        the = the_name(c[0], c[1])
        lines = [
            f"{name} went on a trip to {the} with {his} {fam}.",
            f"They flew to {c[2]}.",
            maybe(f"{c[2]} is a big city in {c[3]}."),
            f"{cap1(he)} walked in the streets and ate {food}.",
            maybe(f"It was {w}, so {he} {act.replace('goes', 'went').replace('takes', 'took').replace('flies', 'flew').replace('builds', 'built').replace('reads', 'read').replace('wears', 'wore').replace('drinks', 'drank')}."),
            f"{cap1(he)} bought a {color} {obj} for {friend}.",
            f"After a week, they went home.",
            rng.choice([f"{name} wants to visit {the} again.", "The end.",
                        f"{name} told {friend} all about the trip."]),
        ]
    return fix_articles(" ".join(x for x in lines if x))


# ---------------------------------------------------------------------------
# Document generators (training stream and held-out sets)
# ---------------------------------------------------------------------------
FAMILY_WEIGHTS = {"capital": 30, "continent": 13, "sound": 6, "color": 6, "baby": 5, "opposite": 9,
                  "legs": 5, "day_after": 3, "month_after": 3, "number_after": 4, "add": 10, "sub": 6}


# Document kinds by share of documents: facts 45, chat 33, json 7, story 6,
# sentences 9; by tokens that is about facts 22%, chat 55%, json 6%, story 9%,
# sentences 8% (fact documents are short). The first v2 run spent 62% of its
# tokens on chats and 11% on fact sentences, and learned the facts poorly.
DOC_WEIGHTS = [45, 33, 7, 6, 9]


def tell_me_about(world, rng):
    """A "Tell me about X." request and its answer, for a country, a capital or an animal."""
    r = rng.random()
    if r < 0.6:
        c = rng.choice(world.facts["capital"])
        cont = world.continent_of.get(c.subj)
        where = f"{cap1(_the(c))} is in {cont}." if cont else f"{cap1(_the(c))} is a country."
        if r < 0.35:
            return f"Tell me about {_the(c)}.", f"{where} Its capital is {c.ans}."
        tail = f" {cap1(_the(c))} is in {cont}." if cont else ""
        return f"Tell me about {c.ans}.", f"{c.ans} is the capital of {_the(c)}.{tail}"
    a = rng.choice(sorted(world.animals))
    parts = [chat_answer(f) for f in world.animals[a]]
    return f"Tell me about the {a}.", " ".join(parts)


def favourite_answer(rng):
    kind = rng.choice(["colour", "animal", "food"])
    opts = AMBIGUOUS[kind][1]
    q = {"colour": rng.choice(["What is your favourite colour?", "What is your favorite color?"]),
         "animal": "What is your favourite animal?", "food": "What do you want for lunch?"}[kind]
    x = rng.choice(opts)
    a = {"colour": f"My favourite colour is {x}.", "animal": f"My favourite animal is the {x}.",
         "food": f"I would like {x}."}[kind]
    return q, a


def counting_text(rng, chat=False):
    """A counting run in words or digits ("three, four, five")."""
    lo = rng.randint(0, 8) if rng.random() < 0.5 else 1
    hi = min(20, lo + rng.randint(2, 8))
    words = rng.random() < 0.7
    seq = [NUMBER_WORDS[i] if words else str(i) for i in range(lo, hi + 1)]
    run = ", ".join(seq)
    upto = NUMBER_WORDS[hi] if words else str(hi)
    start = NUMBER_WORDS[lo] if words else str(lo)
    if chat:
        q = f"Count to {upto}." if lo == 1 else f"Count from {start} to {upto}."
        return q, end_sentence(cap1(run))
    return rng.choice([f"Let's count: {run}.", f"Count with me: {run}.", f"{cap1(run)}."])


def time_sentence(rng):
    i = rng.randrange(7)
    m = rng.randrange(12)
    return rng.choice([
        f"The days of the week are {', '.join(WEEK[:-1])} and {WEEK[-1]}.",
        f"The seasons are {', '.join(SEASONS[:-1])} and {SEASONS[-1]}.",
        f"{cap1(SEASONS[(i % 4 + 1) % 4])} comes after {SEASONS[i % 4]}.",
        f"Yesterday was {WEEK[i]}, so today is {WEEK[(i + 1) % 7]}.",
        f"On {WEEK[i]} morning, we go to the {rng.choice(PLACES)}.",
        f"In {MONTHS[m]}, {rng.choice(NAMES_ALL)} has a birthday.",
        f"The {rng.choice(['morning', 'afternoon', 'evening', 'night'])} is {rng.choice(['quiet', 'cold', 'warm', 'long', 'bright', 'dark'])}.",
        "A week has seven days.", "A year has twelve months.", "A day has twenty-four hours.",
        "An hour has sixty minutes.", "The sun rises in the morning and sets in the evening.",
        f"First comes {WEEK[i]}, then {WEEK[(i + 1) % 7]}, then {WEEK[(i + 2) % 7]}.",
    ])


def ambiguous_sentence(rng):
    kind = rng.choice(sorted(AMBIGUOUS))
    stems, opts = AMBIGUOUS[kind]
    return f"{rng.choice(stems)} {rng.choice(opts)}."


NAMES_ALL = GIRLS + BOYS


class World:
    def __init__(self):
        self.facts = build_facts()
        self.all_facts = [f for fs in self.facts.values() for f in fs]
        self.countries = COUNTRIES
        self.continent_of = {f.subj: f.ans for f in self.facts["continent"]}
        # facts about the same subject in related families (capital <-> continent, animal facts)
        self.by_subject = {}
        for fam in RELATED:
            for f in self.facts[fam]:
                self.by_subject[(fam, f.subj)] = f
        self.animals = {}
        for fam in ("sound", "baby", "legs"):
            for f in self.facts[fam]:
                self.animals.setdefault(f.subj, []).append(f)

    # -- which (fact, template) pairs training may use --------------------
    def train_completion_templates(self, f):
        ts = COMPLETION_TEMPLATES[f.family]
        h = heldout_index(f, len(ts))
        return [t for i, t in enumerate(ts) if i != h]

    def train_chat_questions(self, f):
        qs = CHAT_QUESTIONS[f.family]
        h = heldout_index(f, len(qs))
        return [q for i, q in enumerate(qs) if i != h]

    def train_json_questions(self, f):
        h = heldout_index(f, len(JSON_QUESTIONS))
        return [q for i, q in enumerate(JSON_QUESTIONS) if i != h]

    def random_fact(self, rng, families=None):
        fams = families or list(FAMILY_WEIGHTS)
        fam = rng.choices(fams, weights=[FAMILY_WEIGHTS[f] for f in fams])[0]
        return rng.choice(self.facts[fam])

    def fact_sentence(self, rng, f, heldout=False):
        suffix = ANSWER_SUFFIX.get(f.family, "")
        if heldout:
            ts = COMPLETION_TEMPLATES[f.family]
            t = ts[heldout_index(f, len(ts))]
        else:
            r = rng.random()
            if r < 0.15:
                return rng.choice(REVERSE_TEMPLATES[f.family])(f)
            if r < 0.35 and f.family in QUOTED_TEMPLATES:
                return rng.choice(QUOTED_TEMPLATES[f.family])(f)
            t = rng.choice(self.train_completion_templates(f))
        return end_sentence(f"{t(f)} {f.ans}{suffix}")

    # -- document kinds -----------------------------------------------------
    def doc_facts(self, rng, heldout=False):
        n = rng.choice([1, 1, 2, 3, 4])
        if rng.random() < 0.3:  # a paragraph about one country or one animal
            if rng.random() < 0.75:
                c = rng.choice(self.facts["capital"])
                group = [c] + ([self.by_subject[("continent", c.subj)]]
                               if ("continent", c.subj) in self.by_subject else [])
            else:
                group = self.animals[rng.choice(sorted(self.animals))]
            sents = [self.fact_sentence(rng, f, heldout) for f in group]
            rng.shuffle(sents)
            return " ".join(sents)
        sep = rng.choice([" ", "\n"])
        return sep.join(self.fact_sentence(rng, self.random_fact(rng), heldout) for _ in range(n))

    def doc_json(self, rng):
        fams = [f for f in FAMILY_WEIGHTS if f in JSON_KEYS]
        fam = rng.choices(fams, weights=[FAMILY_WEIGHTS[f] for f in fams])[0]
        pool = [f for f in self.facts[fam] if json_allowed(f)]
        return "\n".join(json_text(rng.choice(pool)) for _ in range(rng.randint(1, 4)))

    def fact_turn(self, rng, json_mode=False, want_json=False):
        """A fact question and its answer (a sentence, or JSON when asked)."""
        if json_mode or want_json:
            f = self.random_fact(rng, [k for k in FAMILY_WEIGHTS if k in JSON_KEYS])
            while not json_allowed(f):
                f = self.random_fact(rng, [k for k in FAMILY_WEIGHTS if k in JSON_KEYS])
            if json_mode:
                return f, rng.choice(self.train_chat_questions(f))(f), json_text(f)
            return f, rng.choice(self.train_json_questions(f))(json_noun_phrase(f)), json_text(f)
        f = self.random_fact(rng)
        return f, rng.choice(self.train_chat_questions(f))(f), chat_answer(f)

    def followup_turn(self, rng, prev, json_mode=False):
        """A follow-up that refers to the previous fact, or None if none fits."""
        kinds = ["same", "same", "other", "other", "json", "again", "short"]
        if json_mode:
            kinds = ["same", "same", "other"]
        kind = rng.choice(kinds)
        if kind == "other" and prev.family in RELATED:
            fam = rng.choice(RELATED[prev.family])
            g = self.by_subject.get((fam, prev.subj))
            if g is not None and (not json_mode or json_allowed(g)):
                q = rng.choice(train_phrasings(FOLLOWUP_OTHER[fam], g))
                return g, q, json_text(g) if json_mode else chat_answer(g)
            kind = "same"
        if kind == "other":
            kind = "same"
        if kind == "same":
            g = rng.choice(self.facts[prev.family])
            while g is prev or (json_mode and not json_allowed(g)):
                g = rng.choice(self.facts[prev.family])
            qs = FOLLOWUP_SAME.get(prev.family, DEFAULT_FOLLOWUP_SAME)
            q = rng.choice(train_phrasings(qs, g)).format(x=subject_phrase(g))
            return g, q, json_text(g) if json_mode else chat_answer(g)
        if kind == "json":
            if not json_allowed(prev):
                return None
            return prev, rng.choice(train_phrasings(FOLLOWUP_JSON, prev)), json_text(prev)
        if kind == "again":
            return prev, rng.choice(FOLLOWUP_AGAIN), chat_answer(prev)
        return prev, rng.choice(FOLLOWUP_SHORT), short_answer(prev)

    def other_turn(self, rng):
        """Small talk, stories, counting, favourites, "Tell me about"."""
        r = rng.random()
        if r < 0.22:
            qs, a = rng.choice(SMALL_TALK)
            return rng.choice(qs), a
        if r < 0.50:
            if rng.random() < 0.4:
                hero = rng.choice(NAMES_ALL)
                return rng.choice(HERO_REQUESTS).format(x=hero), story(rng, hero=hero)
            pet = rng.choice(PETS)
            req = rng.choice(STORY_REQUESTS)
            if "{x}" in req:
                return req.replace("{x}", f"{art(pet)} {pet}"), story(rng, topic_pet=pet)
            return req, story(rng)
        if r < 0.65:
            return counting_text(rng, chat=True)
        if r < 0.78:
            return favourite_answer(rng)
        return tell_me_about(self, rng)

    def doc_chat(self, rng):
        msgs = []
        json_mode = rng.random() < 0.06
        if json_mode:
            msgs.append({"role": "system", "content": rng.choice(JSON_SYSTEM_PROMPTS)})
        elif rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prev = None
        for _ in range(rng.choice([1, 2, 2, 3, 3, 4])):
            turn = None
            r = rng.random()
            if prev is not None and r < 0.6:
                turn = self.followup_turn(rng, prev, json_mode)
            if turn is None and not json_mode and r > 0.8:
                u, a = self.other_turn(rng)
                prev = None
            else:
                if turn is None:
                    turn = self.fact_turn(rng, json_mode=json_mode, want_json=rng.random() < 0.2)
                prev, u, a = turn
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return render_chat(msgs)

    def doc_sentences(self, rng):
        out = []
        for _ in range(rng.randint(2, 6)):
            r = rng.random()
            if r < 0.12:
                out.append(counting_text(rng))
            elif r < 0.24:
                out.append(time_sentence(rng))
            elif r < 0.40:
                out.append(ambiguous_sentence(rng))
            else:
                out.append(simple_sentence(rng, self.countries))
        return " ".join(out)

    def doc(self, rng):
        kind = rng.choices(["facts", "chat", "json", "story", "sentences"], weights=DOC_WEIGHTS)[0]
        return getattr(self, "doc_" + kind)(rng) if kind != "story" else story(rng)


def render_chat(messages, add_generation_prompt=False):
    """Python twin of CHAT_TEMPLATE (checked against the Jinja one in eval)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def make_corpus(world, n_docs, seed):
    rng = random.Random(seed)
    return [world.doc(rng) for _ in range(n_docs)]


def heldout_prompts(world):
    """Evaluation prompts whose exact strings are built never to be trained."""
    facts, chats, jsons = [], [], []
    for f in world.all_facts:
        ts = COMPLETION_TEMPLATES[f.family]
        facts.append({"family": f.family, "prompt": ts[heldout_index(f, len(ts))](f),
                      "answer": f.ans, "kind": "held-out template"})
    anchors = [{"family": f.family, "prompt": COMPLETION_TEMPLATES[f.family][0](f),
                "answer": f.ans, "kind": "trained template"} for f in world.all_facts]
    sys_rng = random.Random(7)
    for f in world.all_facts:
        qs = CHAT_QUESTIONS[f.family]
        q = qs[heldout_index(f, len(qs))](f)
        msgs = [{"role": "user", "content": q}]
        if f.index % 2 == 1:  # half of them with a system message
            msgs.insert(0, {"role": "system", "content": sys_rng.choice(SYSTEM_PROMPTS)})
        chats.append({"family": f.family, "messages": msgs, "answer": chat_answer(f)})
    for f in world.all_facts:
        if f.family not in JSON_KEYS:
            continue
        if json_allowed(f):
            q = JSON_QUESTIONS[heldout_index(f, len(JSON_QUESTIONS))](json_noun_phrase(f))
            kind = "held-out JSON phrasing"
        else:
            q = JSON_QUESTIONS[f.index % len(JSON_QUESTIONS)](json_noun_phrase(f))
            kind = "fact never seen as JSON"
        jsons.append({"family": f.family, "messages": [{"role": "user", "content": q}],
                      "expected": json_object(f), "kind": kind})
    json_completion = []
    for f in world.facts["capital"] + world.facts["continent"]:
        if not json_allowed(f):
            k1, k2 = JSON_KEYS[f.family]
            json_completion.append({"family": f.family,
                                    "prompt": f'{{"{k1}": "{f.subj}", "{k2}": "',
                                    "expected": json_object(f), "kind": "fact never seen as JSON"})
    return {"facts": facts, "anchors": anchors, "chat": chats, "json_chat": jsons,
            "json_completion": json_completion, "followup": followup_chains(world)}


def followup_chains(world):
    """Multi-turn conversations whose later questions only make sense with the
    earlier turns. Each chain is a list of (user message, expected reply, kind).
    "held-out" chains use, for every turn, the phrasing that fact never sees in
    training; "anchor" chains use the trained phrasings the README shows.
    The exchange (previous reply, follow-up) is checked against the corpus."""
    rng = random.Random(11)
    chains = []
    caps = world.facts["capital"]
    for i in range(90):
        style = "anchor" if i % 3 == 0 else "held-out"
        c1 = caps[(i * 7) % len(caps)]
        c2 = rng.choice([c for c in caps if c is not c1 and ("continent", c.subj) in world.by_subject])
        cont2 = world.by_subject[("continent", c2.subj)]
        pick = (lambda qs, f: qs[0]) if style == "anchor" else (lambda qs, f: qs[heldout_index(f, len(qs))])
        q1 = pick(CHAT_QUESTIONS["capital"], c1)(c1)
        chains.append({"style": style, "turns": [
            (q1, chat_answer(c1), "first question"),
            (pick(FOLLOWUP_SAME["capital"], c2).format(x=subject_phrase(c2)), chat_answer(c2), "same relation, new subject"),
            (pick(FOLLOWUP_OTHER["continent"], cont2), chat_answer(cont2), "same subject, other relation"),
            (pick(FOLLOWUP_JSON, cont2), json_text(cont2), "say it again in JSON"),
        ]})
    animals = sorted(a for a, fs in world.animals.items() if len(fs) == 3)
    for i in range(30):
        style = "anchor" if i % 3 == 0 else "held-out"
        pick = (lambda qs, f: qs[0]) if style == "anchor" else (lambda qs, f: qs[heldout_index(f, len(qs))])
        a1, a2 = rng.sample(animals, 2)
        s1 = world.by_subject[("sound", a1)]
        s2 = world.by_subject[("sound", a2)]
        b2 = world.by_subject[("baby", a2)]
        l2 = world.by_subject[("legs", a2)]
        chains.append({"style": style, "turns": [
            (pick(CHAT_QUESTIONS["sound"], s1)(s1), chat_answer(s1), "first question"),
            (pick(DEFAULT_FOLLOWUP_SAME, s2).format(x=subject_phrase(s2)), chat_answer(s2), "same relation, new subject"),
            (pick(FOLLOWUP_OTHER["baby"], b2), chat_answer(b2), "same subject, other relation"),
            (pick(FOLLOWUP_OTHER["legs"], l2), chat_answer(l2), "same subject, other relation"),
        ]})
    adds = world.facts["add"]
    for i in range(30):
        f1, f2 = rng.sample(adds, 2)
        chains.append({"style": "anchor", "turns": [
            (CHAT_QUESTIONS["add"][0](f1), chat_answer(f1), "first question"),
            (FOLLOWUP_SAME["add"][0].format(x=subject_phrase(f2)), chat_answer(f2), "same relation, new subject"),
            (FOLLOWUP_SHORT[0], short_answer(f2), "short answer"),
        ]})
    return chains


def heldout_text_docs(world, n, seed, train_set):
    """Held-out text for perplexity: fact sentences built only from held-out
    template x fact pairs, chats using held-out question phrasings, and fresh
    stories / sentences; any document that also occurs in training is dropped."""
    rng = random.Random(seed)
    docs = []
    while len(docs) < n:
        kind = rng.choices(["facts", "chat", "story", "sentences"], weights=[30, 20, 25, 25])[0]
        if kind == "facts":
            d = world.doc_facts(rng, heldout=True)
        elif kind == "chat":
            f = world.random_fact(rng)
            qs = CHAT_QUESTIONS[f.family]
            d = render_chat([{"role": "user", "content": qs[heldout_index(f, len(qs))](f)},
                             {"role": "assistant", "content": chat_answer(f)}])
        elif kind == "story":
            d = story(rng)
        else:
            d = world.doc_sentences(rng)
        if d not in train_set:
            docs.append((kind, d))
    return docs


# ---------------------------------------------------------------------------
# (b) Tokenizer
# ---------------------------------------------------------------------------
def tokenizer_supplement(repeat=30):
    """Every name of the world as a JSON value ('"Paris"') and at a line start.

    Inside JSON a value follows a quote, so it is written without a leading
    space; the corpus has few such forms, and BPE left them in pieces ("Par" +
    "is", "T" + "okyo") unrelated to the running-text tokens (" Paris"). Seen
    here, each name gets a whole token in both forms. This text trains only
    the tokenizer, not the model."""
    names = set()
    for name, _, capital, continent in COUNTRIES:
        names.update([name, capital] + ([continent] if continent else []))
    for pairs in (ANIMAL_SOUNDS, FOOD_COLORS, BABY_ANIMALS, OPPOSITE_PAIRS, ANIMAL_LEGS):
        for a, b in pairs:
            names.update([a, b])
    line = " ".join(f'"{n}"' for n in sorted(names)) + "\n" + "\n".join(sorted(names)) + "\n"
    return line * repeat


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # special-token strings are stripped from the BPE training text: they are
    # atomic added tokens and must not be learned as merges
    def clean():
        for t in texts:
            for s in SPECIAL_TOKENS:
                t = t.replace(s, "\n")
            yield t
        yield tokenizer_supplement()
    tok.train_from_iterator(clean(), trainer=trainer, length=len(texts) + 1)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    return tok


# ---------------------------------------------------------------------------
# (c) Model and training
# ---------------------------------------------------------------------------
def model_args_dict(cfg, vocab_size):
    return {
        "model_type": "llama",
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "intermediate_size": cfg["intermediate_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg["seq_len"],
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": cfg["rope_theta"],
        "rope_traditional": False,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "layer_types": ["full_attention"] * cfg["num_hidden_layers"],
        "sliding_window": None,
    }


def pack_rows(doc_tokens, order, seq_len, eot_id):
    """Rows of seq_len+1 tokens. Every row starts at a document start (as a
    prompt does at inference); documents follow each other separated by
    <|endoftext|>, and the one that overflows the row is cut."""
    rows, row = [], []
    width = seq_len + 1
    for i in order:
        row.extend(doc_tokens[i])
        row.append(eot_id)
        if len(row) >= width:
            rows.append(row[:width])
            row = []
    return np.asarray(rows, dtype=np.int32)


def lr_at(step, total, cfg):
    peak, warm = cfg["peak_lr"], cfg["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    prog = min(1.0, (step - warm) / max(1, total - warm))
    lo = peak * cfg["min_lr_ratio"]
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * prog))


LLAMA_FAST_MATH = {"mlx_lm.models.llama": {"scaled_dot_product_attention": fast_attention,
                                             "swiglu": fast_swiglu}}


def check_fast_math(model, batch):
    """The fast training loss must equal the stock loss of the same model."""
    x, y = batch[:, :-1], batch[:, 1:]
    ref = nn.losses.cross_entropy(model(x), y, reduction="mean").item()
    with patched(LLAMA_FAST_MATH):
        fast = fast_cross_entropy(model(x), y).item()
    assert abs(fast - ref) < 1e-3 * max(1.0, abs(ref)), (fast, ref)
    return ref, fast


def train(cfg, doc_tokens, vocab_size, eot_id, steps, minutes, seed):
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    np_rng = np.random.default_rng(seed)
    args = ModelArgs.from_dict(model_args_dict(cfg, vocab_size))
    model = Model(args)
    model.set_dtype(mx.float32)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M)")

    B, T = cfg["batch_size"], cfg["seq_len"]

    def epoch_rows():
        while True:
            yield from pack_rows(doc_tokens, np_rng.permutation(len(doc_tokens)), T, eot_id)

    row_iter = epoch_rows()

    def next_batch():
        return mx.array(np.stack([next(row_iter) for _ in range(B)]))

    opt = optim.AdamW(learning_rate=cfg["peak_lr"], betas=list(cfg["adam_betas"]),
                      weight_decay=cfg["weight_decay"])

    def loss_fn(m, x, y):
        return fast_cross_entropy(m(x), y)

    probe = next_batch()
    ref, fast = check_fast_math(model, probe)
    log(f"fast training math: loss {fast:.6f} vs stock {ref:.6f}")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    from functools import partial

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(batch):
        loss, grads = loss_and_grad(model, batch[:, :-1], batch[:, 1:])
        grads, gnorm = optim.clip_grad_norm(grads, cfg["grad_clip"])
        opt.update(model, grads)
        return loss, gnorm

    total = steps
    budget_s = None if steps else minutes * 60.0
    calib_steps, recalib_steps = 50, 250
    t_calib = t0 = time.time()
    t0 = time.time()
    tokens_seen = 0
    step = 0
    ema = None
    history = []
    window_t, window_tok = time.time(), 0
    loads = []
    patch = patched(LLAMA_FAST_MATH)  # see scripts/fast_training_math.py
    patch.__enter__()
    while True:
        if total is not None and step >= total:
            break
        lr = lr_at(step, total if total else 10**9, cfg)
        opt.learning_rate = mx.array(lr, dtype=mx.float32)
        batch = next_batch()
        loss, gnorm = step_fn(batch)
        mx.eval(loss, gnorm, state)
        step += 1
        tokens_seen += B * T
        window_tok += B * T
        loss_v = loss.item()
        ema = loss_v if ema is None else 0.95 * ema + 0.05 * loss_v
        if total is None and step == 5:
            t_calib = time.time()  # after compilation and warm-up
        if budget_s is not None and step in (calib_steps, recalib_steps):
            # the speed of a shared CPU drifts: measure twice, the second time over a longer window
            since, t_since = (5, t_calib) if step == calib_steps else (calib_steps, t_recalib)
            per_step = (time.time() - t_since) / (step - since)
            total = step + int((budget_s - (time.time() - t0)) / per_step)
            t_recalib = time.time()
            log(f"budget {minutes:.1f} min at {per_step:.3f} s/step -> --steps {total}")
        if step % 25 == 0 or step == 1 or step == total:
            now = time.time()
            tps = window_tok / max(1e-9, now - window_t)
            window_t, window_tok = now, 0
            log(f"step {step:5d}/{total or '?'}  loss {loss_v:.4f}  ema {ema:.4f}  "
                f"lr {lr:.2e}  gnorm {gnorm.item():.2f}  tok/s {tps:,.0f}  "
                f"elapsed {(now - t0) / 60:.1f} min")
            history.append({"step": step, "loss": round(ema, 4)})
            loads.append(float(loadavg().split()[0]))
    patch.__exit__(None, None, None)
    train_s = time.time() - t0
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_s / 60:.1f} min")
    return model, args, {"steps": step, "tokens": tokens_seen, "train_seconds": round(train_s, 1),
                         "params": n_params, "final_loss_ema": round(ema, 4), "loss_history": history,
                         "load_1min_during": {"min": min(loads), "median": float(np.median(loads)),
                                              "max": max(loads)}}


# ---------------------------------------------------------------------------
# (e) Writing the folder
# ---------------------------------------------------------------------------
def write_folder(out, model, cfg, tokenizer, vocab_size):
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(mx, cfg["save_dtype"])
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    ids = {s: tokenizer.token_to_id(s) for s in SPECIAL_TOKENS}
    config = model_args_dict(cfg, vocab_size)
    config.update({
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": cfg["save_dtype"],
        "bos_token_id": ids[EOT],
        "eos_token_id": [ids[IM_END], ids[EOT]],
        "pad_token_id": ids[EOT],
    })
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids[EOT],
        "eos_token_id": [ids[IM_END], ids[EOT]],
        "pad_token_id": ids[EOT],
        "do_sample": False,
    }, indent=2) + "\n")

    tokenizer.save(str(out / "tokenizer.json"))
    added = {str(ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for s in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": IM_END,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["seq_len"],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": EOT, "eos_token": IM_END, "pad_token": EOT,
        "additional_special_tokens": [IM_START, IM_END],
    }, indent=2) + "\n")


# ---------------------------------------------------------------------------
# (d) Evaluation of the written folder, through mlx_lm.load
# ---------------------------------------------------------------------------
def _is_word_char(ch):
    return ch.isalnum() or ch in "-'"


def generate_greedy(model, tokenizer, prompt_ids, max_tokens, stop_ids):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(prompt_ids)[None]
    out = []
    for _ in range(max_tokens):
        logits = model(x, cache=cache)[:, -1, :]
        tok = int(mx.argmax(logits, axis=-1).item())
        if tok in stop_ids:
            return out, True
        out.append(tok)
        x = mx.array([[tok]])
    return out, False


def evaluate(folder, world, corpus_text, train_set, cfg, seed, quick=False):
    import mlx_lm

    folder = Path(folder)
    t = time.time()
    model, tokenizer = mlx_lm.load(str(folder))
    load_s = time.time() - t
    t = time.time()
    mlx_lm.load(str(folder))
    load_warm_s = time.time() - t
    hf = tokenizer._tokenizer
    eos_ids = set(tokenizer.eos_token_ids)
    im_end = hf.convert_tokens_to_ids(IM_END)
    eot = hf.convert_tokens_to_ids(EOT)
    assert {im_end, eot} <= eos_ids, eos_ids
    res = {"load_seconds_first": round(load_s, 3), "load_seconds": round(load_warm_s, 3)}
    P = heldout_prompts(world)
    res["quick"] = quick
    if quick:  # pilots: every third prompt and chain, fewer perplexity documents
        P = {k: v[::3] for k, v in P.items()}
        cfg = dict(cfg, heldout_docs=cfg["heldout_docs"] // 4)

    def enc(s):
        return hf.encode(s, add_special_tokens=False)

    def greedy_speed():
        """mlx_lm's own generation speed (tokens/s after the prompt), batch 1."""
        mlx_lm.generate(model, tokenizer, "Once upon a time", max_tokens=16)  # warm-up
        r = None
        for r in mlx_lm.stream_generate(model, tokenizer, "Once upon a time", max_tokens=128):
            pass
        return round(r.generation_tps, 1)

    # Speed and a spot check in the stored dtype; on a CPU without fast
    # float16 kernels this path is slow, so the full evaluation below runs
    # with the same weights upcast to float32 (every float16 value is exact
    # in float32).
    res["stored_dtype"] = str(model.model.embed_tokens.weight.dtype)
    res["greedy_tok_per_s_stored_dtype"] = greedy_speed()
    spot = P["facts"][::12]
    spot_out = [hf.decode(generate_greedy(model, tokenizer, enc(p["prompt"]), 6, eos_ids)[0])
                for p in spot]
    model.set_dtype(mx.float32)
    res["greedy_tok_per_s"] = greedy_speed()
    spot_out32 = [hf.decode(generate_greedy(model, tokenizer, enc(p["prompt"]), 6, eos_ids)[0])
                  for p in spot]
    res["fp16_vs_fp32_spot_agreement"] = f"{sum(a == b for a, b in zip(spot_out, spot_out32))}/{len(spot)}"
    log(f"greedy tok/s: {res['greedy_tok_per_s_stored_dtype']} stored dtype, "
        f"{res['greedy_tok_per_s']} float32; spot agreement {res['fp16_vs_fp32_spot_agreement']}")

    # the Jinja chat template and the corpus renderer must agree exactly
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}]
    assert hf.apply_chat_template(probe, tokenize=False) == render_chat(probe)
    assert hf.apply_chat_template(probe[1:2], tokenize=False, add_generation_prompt=True) == \
        render_chat(probe[1:2], add_generation_prompt=True)

    # no held-out prompt string may occur anywhere in the training corpus
    def leaks(strings):
        return [s for s in strings if s in corpus_text]

    fact_leaks = leaks([p["prompt"] for p in P["facts"]])
    # the user turn alone, with its delimiters, must be new (stricter than the whole prompt)
    chat_leaks = leaks([f"{IM_START}user\n{p['messages'][-1]['content']}{IM_END}"
                        for p in P["chat"] + P["json_chat"]])
    jc_leaks = leaks([p["prompt"] for p in P["json_completion"]])
    res["heldout_prompt_leaks"] = len(fact_leaks) + len(chat_leaks) + len(jc_leaks)
    if res["heldout_prompt_leaks"]:
        log("WARNING leaked held-out prompts:", (fact_leaks + chat_leaks + jc_leaks)[:10])
    # follow-ups: the exchange "previous reply, follow-up question" of a held-out
    # chain must be new to the corpus (anchor chains are trained phrasings)
    fu_strings = [f"{prev[1]}{IM_END}\n{IM_START}user\n{cur[0]}{IM_END}"
                  for c in P["followup"] if c["style"] == "held-out"
                  for prev, cur in zip(c["turns"], c["turns"][1:])]
    res["followup_exchanges_checked"] = len(fu_strings)
    res["followup_exchange_leaks"] = len(leaks(fu_strings))

    # facts: greedy continuation must start with " <answer>" and end the word there
    def fact_eval(items):
        per_fam, wrong = {}, []
        for p in items:
            ids, _ = generate_greedy(model, tokenizer, enc(p["prompt"]), 8, eos_ids)
            text = hf.decode(ids)
            want = " " + p["answer"]
            ok = text.startswith(want) and (len(text) == len(want) or not _is_word_char(text[len(want)]))
            fam = per_fam.setdefault(p["family"], [0, 0])
            fam[0] += ok
            fam[1] += 1
            if not ok:
                wrong.append((p["prompt"], p["answer"], text))
        n_ok = sum(v[0] for v in per_fam.values())
        n = sum(v[1] for v in per_fam.values())
        return {"accuracy": round(n_ok / n, 4), "correct": n_ok, "total": n,
                "per_family": {k: f"{v[0]}/{v[1]}" for k, v in per_fam.items()},
                "examples_wrong": wrong[:8]}

    t = time.time()
    res["facts_heldout"] = fact_eval(P["facts"])
    res["facts_trained_template"] = fact_eval(P["anchors"])
    log(f"facts held-out {res['facts_heldout']['accuracy']:.3f}  trained-template "
        f"{res['facts_trained_template']['accuracy']:.3f}  ({time.time() - t:.0f}s)")

    # probability of " Paris" after the demo prompt
    ids = enc("The capital of France is")
    logits = model(mx.array(ids)[None])[0, -1].astype(mx.float32)
    probs = mx.softmax(logits)
    paris = enc(" Paris")
    res["p_paris"] = round(probs[paris[0]].item(), 4)
    top = mx.argsort(-probs)[:5].tolist()
    res["top5_after_france"] = [(hf.decode([i]), round(probs[i].item(), 4)) for i in top]

    # chat: exact reply and stop on <|im_end|>
    def chat_eval(items):
        ok_n, stop_n, wrong = 0, 0, []
        for p in items:
            prompt = hf.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
            ids, stopped = generate_greedy(model, tokenizer, enc(prompt), 40, {im_end, eot})
            reply = hf.decode(ids)
            stop_n += stopped
            ok = stopped and reply == p["answer"]
            ok_n += ok
            if not ok:
                wrong.append((p["messages"][-1]["content"], reply))
        return {"accuracy": round(ok_n / len(items), 4), "correct": ok_n, "total": len(items),
                "stopped_on_im_end": round(stop_n / len(items), 4), "examples_wrong": wrong[:8]}

    t = time.time()
    res["chat_heldout"] = chat_eval(P["chat"])
    log(f"chat held-out {res['chat_heldout']['accuracy']:.3f} ({time.time() - t:.0f}s)")

    def json_eval(items, chat):
        valid, correct, wrong = 0, 0, []
        by_kind = {}
        for p in items:
            if chat:
                prompt = hf.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
                ids, _ = generate_greedy(model, tokenizer, enc(prompt), 40, {im_end, eot})
                text = hf.decode(ids)
            else:
                ids, _ = generate_greedy(model, tokenizer, enc(p["prompt"]), 30, {eot, im_end} | set(enc("\n")))
                text = p["prompt"] + hf.decode(ids).split("\n")[0]
            try:
                obj = json.loads(text)
                is_valid = isinstance(obj, dict)
            except json.JSONDecodeError:
                obj, is_valid = None, False
            good = is_valid and obj == p["expected"]
            valid += is_valid
            correct += good
            k = by_kind.setdefault(p["kind"], [0, 0, 0])
            k[0] += is_valid
            k[1] += good
            k[2] += 1
            if not good:
                wrong.append(((p["messages"][-1]["content"] if chat else p["prompt"]), text))
        n = len(items)
        return {"valid_rate": round(valid / n, 4), "correct_rate": round(correct / n, 4), "total": n,
                "by_kind": {k: {"valid": v[0], "correct": v[1], "total": v[2]} for k, v in by_kind.items()},
                "examples_wrong": wrong[:8]}

    t = time.time()
    res["json_chat_heldout"] = json_eval(P["json_chat"], chat=True)
    res["json_completion_heldout"] = json_eval(P["json_completion"], chat=False)
    log(f"json chat valid {res['json_chat_heldout']['valid_rate']:.3f} correct "
        f"{res['json_chat_heldout']['correct_rate']:.3f}; json completion valid "
        f"{res['json_completion_heldout']['valid_rate']:.3f} ({time.time() - t:.0f}s)")

    # perplexity on held-out text, per kind and overall (every token after the
    # first is predicted, including the closing <|endoftext|>)
    t = time.time()
    docs = heldout_text_docs(world, cfg["heldout_docs"], seed + 99, train_set)
    nll, cnt = {}, {}
    for kind, d in docs:
        ids = enc(d) + [eot]
        x = mx.array(ids)[None]
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum").item()
        nll[kind] = nll.get(kind, 0.0) + loss
        cnt[kind] = cnt.get(kind, 0) + len(ids) - 1
    res["heldout_ppl"] = round(math.exp(sum(nll.values()) / sum(cnt.values())), 3)
    res["heldout_ppl_by_kind"] = {k: round(math.exp(nll[k] / cnt[k]), 3) for k in nll}
    res["heldout_tokens"] = sum(cnt.values())
    res["heldout_docs"] = len(docs)
    log(f"held-out perplexity {res['heldout_ppl']:.3f} over {res['heldout_tokens']:,} tokens "
        f"{res['heldout_ppl_by_kind']} ({time.time() - t:.0f}s)")

    # multi-turn: run each chain with the model's own replies in the history (as
    # nbllm.Chat does) and score every turn's reply exactly
    t = time.time()
    fu = {}
    fu_wrong = []
    transcripts = []
    for chain in P["followup"]:
        msgs = []
        for q, want, kind in chain["turns"]:
            msgs.append({"role": "user", "content": q})
            prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids, stopped = generate_greedy(model, tokenizer, enc(prompt), 60, {im_end, eot})
            reply = hf.decode(ids)
            msgs.append({"role": "assistant", "content": reply})
            ok = stopped and reply == want
            for key in (f"{chain['style']}: {kind}", f"all: {kind}"):
                k = fu.setdefault(key, [0, 0])
                k[0] += ok
                k[1] += 1
            if not ok and kind != "first question":
                fu_wrong.append((q, want, reply))
        if len(transcripts) < 4 or (chain["style"] == "anchor" and len(transcripts) < 6):
            transcripts.append(msgs)
    later = [v for k, v in fu.items() if k.startswith("all: ") and k != "all: first question"]
    res["followup"] = {
        "accuracy": round(sum(v[0] for v in later) / sum(v[1] for v in later), 4),
        "correct": sum(v[0] for v in later), "total": sum(v[1] for v in later),
        "by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(fu.items())},
        "chains": len(P["followup"]), "examples_wrong": fu_wrong[:8], "transcripts": transcripts[:6],
    }
    log(f"follow-ups {res['followup']['accuracy']:.3f} {res['followup']['by_kind']} ({time.time() - t:.0f}s)")

    # deliberate ambiguity: how spread out the next-token distribution is
    amb = []
    for kind, (stems, opts) in AMBIGUOUS.items():
        for stem in stems[:2]:
            logits = model(mx.array(enc(stem))[None])[0, -1].astype(mx.float32)
            probs = np.array(mx.softmax(logits).tolist())
            ent = float(-(probs * np.log2(np.clip(probs, 1e-12, 1))).sum())
            opt_ids = [enc(" " + o)[0] for o in opts]
            top = np.argsort(-probs)[:6]
            amb.append({"prompt": stem, "entropy_bits": round(ent, 3),
                        "uniform_bits": round(math.log2(len(opts)), 3),
                        "p_options": round(float(probs[list(set(opt_ids))].sum()), 4),
                        "top": [(hf.decode([int(i)]), round(float(probs[i]), 3)) for i in top]})
    res["ambiguity"] = amb
    log("ambiguity: " + "; ".join(f"{a['prompt']!r} H={a['entropy_bits']} bits" for a in amb))

    # samples for the card
    samples = {}
    for prompt in ["The capital of France is", "Once upon a time", "Mia likes to",
                   '{"country": "Japan", "capital": "', "3 + 4 =", "one, two, three, four,",
                   "The day after Monday is", "My favourite colour is"]:
        ids, _ = generate_greedy(model, tokenizer, enc(prompt), 48, {eot})
        samples[prompt] = hf.decode(ids)
    for msgs in ([{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Give the capital of Japan as JSON."}],
                 [{"role": "user", "content": "Give the capital of France as JSON."}],
                 [{"role": "user", "content": "Tell me a story about a cat."}],
                 [{"role": "user", "content": "Tell me a story."}],
                 [{"role": "user", "content": "Tell me a short story about a cat."}],
                 [{"role": "user", "content": "Tell me a story about Mia."}],
                 [{"role": "user", "content": "Tell me about Paris."}],
                 [{"role": "user", "content": "What is 7 minus 3?"}],
                 [{"role": "user", "content": "How many legs does a spider have?"}],
                 [{"role": "user", "content": "Count to five."}]):
        prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids, _ = generate_greedy(model, tokenizer, enc(prompt), 80, {im_end, eot})
        samples["chat: " + msgs[-1]["content"]] = hf.decode(ids)
    # the README's conversation, with the model's own replies in the history
    msgs = []
    for q in ["What is the capital of Japan?", "And of France?", "What about its continent?",
              "Say that again in JSON."]:
        msgs.append({"role": "user", "content": q})
        prompt = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids, _ = generate_greedy(model, tokenizer, enc(prompt), 60, {im_end, eot})
        msgs.append({"role": "assistant", "content": hf.decode(ids)})
    res["readme_chat"] = msgs
    log("README chat: " + " | ".join(m["content"] for m in msgs))
    res["samples"] = samples
    return res


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------
def folder_size_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# The version-1 model's card figures (nbllm 0.1.0, 2.4M parameters, 34 min), the baseline to beat.
V1_BASELINE = {
    "facts_heldout": "93.8% (435/464)", "facts_trained": "100.0% (464/464)", "ppl": "2.06",
    "chat": "98.9% (459/464)", "json_chat": "99.8% valid, 92.0% right (464)",
    "json_never_seen": "64/64 valid, 30/64 right", "json_completion": "98.4% valid, 48.4% right (64)",
    "p_paris": "0.9944", "followup": "not trained (\"And of France?\" -> \"A baby bear is called a cub.\")",
}


def machine_line(report):
    """Where and how the run trained, from the report (threads, cores, load, other work)."""
    tr = report["training"]
    during = tr.get("load_1min_during")
    line = (f"float32 matmuls through OpenBLAS with {report.get('blas_threads', '?')} BLAS thread(s)"
            + (f" on CPU core(s) {report['cpu_affinity']}" if report.get("cpu_affinity") else "")
            + f"; load average {report.get('load_before', '?')} before, {report.get('load_after', '?')} after")
    if during:
        line += f", 1-minute load during training {during['min']:.2f}-{during['max']:.2f} (median {during['median']:.2f})"
    if report.get("machine_note"):
        line += f" ({report['machine_note']})"
    return line


def budget_line(report):
    if report.get("minutes_budget"):
        return (f"The step count came from a {report['minutes_budget']:g}-minute budget and the speed measured "
                "over steps 5-50, then 50-250.")
    return "The step count was fixed on the command line."


def write_draft_card(out, report):
    """A short card for the draft model (issue 15)."""
    cfg, tr, ev = report["config"], report["training"], report["eval"]
    fh, ft = ev["facts_heldout"], ev["facts_trained_template"]
    spec_path = Path(out) / "speculative.json"
    spec = ""
    if spec_path.exists():
        sp = json.loads(spec_path.read_text())
        spec = "\n## Speculative decoding with the default model (measured)\n\n" + sp["markdown"] + "\n"
    card = f"""# nbllm draft model ("nbllm-tiny-world-draft")

A very small model for **speculative decoding** with nbllm's default model
(`nbllm/assets/default-model`): it proposes tokens, the default model checks them in one pass.
It was trained from scratch by `scripts/train_default_model.py --size draft` on the script's
generated corpus (same seed; the script's world is version 2's, a superset of the world of the
shipped version-1 default model), with the default model's own tokenizer
(`{report.get('tokenizer_from')}`, loaded, not retrained), so the two share every token id.
Teaching only; on its own it is a much weaker model than the default one.

## Architecture

- mlx-lm's Llama (`model_type: "llama"`), {tr['params']:,} parameters ({tr['params'] / 1e6:.2f}M): hidden size
  {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, SwiGLU MLP of
  {cfg['intermediate_size']}, tied embeddings; vocabulary {report['vocab_size']} (the default model's), ChatML template.
- Weights stored as {cfg['save_dtype']}; folder size {report['folder_bytes'] / 1e6:.1f} MB.

## Training

- Command: `{report['command']}`
- Seed {cfg['seed']}; {tr['steps']:,} steps of batch {cfg['batch_size']} x {cfg['seq_len']} tokens =
  {tr['tokens']:,} tokens; peak learning rate {cfg['peak_lr']:g}, otherwise as the default model.
- {tr['train_seconds'] / 60:.1f} minutes of wall time on {report['machine']}, {machine_line(report)};
  {tr['tokens'] / tr['train_seconds']:,.0f} tokens/s. Final training loss (EMA) {tr['final_loss_ema']}.

## Evaluation (the script's held-out sets, greedy{', a third of each set' if ev.get('quick') else ''})

| measure | draft |
| --- | --- |
| greedy fact accuracy, held-out phrasings | {fh['accuracy'] * 100:.1f}% ({fh['correct']}/{fh['total']}) |
| greedy fact accuracy, trained anchor phrasing | {ft['accuracy'] * 100:.1f}% ({ft['correct']}/{ft['total']}) |
| perplexity on held-out generated text | {ev['heldout_ppl']:.2f} |
| P(" Paris" \\| "The capital of France is") | {ev['p_paris']} |
{spec}"""
    (Path(out) / "MODEL_CARD.md").write_text(card)


def write_card(out, report):
    cfg, tr, ev = report["config"], report["training"], report["eval"]
    n_facts = report["n_facts"]
    fh, ft = ev["facts_heldout"], ev["facts_trained_template"]
    ch, jc, jp = ev["chat_heldout"], ev["json_chat_heldout"], ev["json_completion_heldout"]
    fu = ev["followup"]
    never = jc["by_kind"].get("fact never seen as JSON", {"valid": 0, "correct": 0, "total": 0})
    heldj = jc["by_kind"].get("held-out JSON phrasing", {"valid": 0, "correct": 0, "total": 0})
    size_mb = report["folder_bytes"] / 1e6
    b = V1_BASELINE
    samples = "\n".join(f"- `{k!r}` → `{v!r}`" for k, v in ev["samples"].items())
    fam_rows = "\n".join(f"| {k} | {n_facts[k]} | {fh['per_family'][k]} | {ft['per_family'][k]} |"
                         for k in n_facts)
    fu_rows = "\n".join(f"| {k} | {v} |" for k, v in fu["by_kind"].items())
    amb_rows = "\n".join(
        f"| `{a['prompt']}` | {a['entropy_bits']:.2f} (uniform: {a['uniform_bits']:.2f}) | {a['p_options']:.2f} | "
        + ", ".join(f"`{t!r}` {p:.2f}" for t, p in a["top"][:5]) + " |" for a in ev["ambiguity"])
    transcripts = []
    for msgs in fu["transcripts"][:3]:
        transcripts.append("\n".join(f"  - {m['role']}: `{m['content']}`" for m in msgs))
    transcripts = "\n- conversation:\n".join([""] + transcripts).lstrip("\n")
    card = f"""# nbllm default model, version 2 ("nbllm-tiny-world")

A tiny decoder-only language model trained from scratch, in {tr['train_seconds'] / 60:.0f} minutes on a
2-core CPU, by `scripts/train_default_model.py`. It ships inside the nbllm package so the
teaching notebooks run offline in seconds. **It is for teaching only**: it knows a small
synthetic world (country capitals and continents; animal sounds, babies and legs; food
colours; opposite words; days, months and numbers in order; sums up to ten and
take-aways within ten; counting; everyday sentences and short stories with named characters; a few
deliberately open prompts such as "My favourite colour is") and nothing else. Outside that
world it produces fluent-looking nonsense. It holds a short conversation: follow-ups such as
"And of France?", "What about its continent?" and "Say that again in JSON." use the earlier turns.

## Architecture

- Class: mlx-lm's own Llama (`mlx_lm.models.llama.Model`, `model_type: "llama"`),
  so `mlx_lm.load("nbllm/assets/default-model")` loads it with no extra code.
- {tr['params']:,} parameters ({tr['params'] / 1e6:.2f}M): hidden size {cfg['hidden_size']},
  {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} attention heads
  (head dim {cfg['hidden_size'] // cfg['num_attention_heads']}, {cfg['num_key_value_heads']} KV heads),
  SwiGLU MLP of {cfg['intermediate_size']}, RMSNorm, RoPE (theta {cfg['rope_theta']:g}),
  tied input/output embeddings.
- Context: trained on {cfg['seq_len']}-token rows (`max_position_embeddings: {cfg['seq_len']}`).
- Weights stored as {cfg['save_dtype']} (`model.safetensors`); training ran in float32.
  Folder size: {size_mb:.1f} MB.
- Tokenizer: byte-level BPE trained with the `tokenizers` library on the corpus plus a list of
  the world's names written as JSON values (`"Paris"`), so that every name is one token both in
  running text (` Paris`) and after a quote (`Paris`); vocabulary {report['vocab_size']} including the special tokens `<|endoftext|>` (id 0),
  `<|im_start|>` (1), `<|im_end|>` (2). No BOS token is prepended when encoding.
- Chat template: ChatML, `<|im_start|>role\\n...<|im_end|>\\n` per message, optional
  system message, `add_generation_prompt` appends `<|im_start|>assistant\\n`.
  Generation stops on `<|im_end|>` or `<|endoftext|>` (both in `eos_token_id`).

## Training

- Command (measured run):
  `{report['command']}`
- Seed {cfg['seed']}; {tr['steps']:,} steps of batch {cfg['batch_size']} x {cfg['seq_len']} tokens
  = {tr['tokens']:,} training tokens (about {tr['tokens'] / report['corpus_tokens']:.2f} passes over the corpus).
  {budget_line(report)}
- AdamW (betas {tuple(cfg['adam_betas'])}, weight decay {cfg['weight_decay']}), peak learning rate
  {cfg['peak_lr']:g}, {cfg['warmup_steps']} linear warm-up steps, cosine decay to
  {cfg['min_lr_ratio']:g}x peak; gradient clipping at {cfg['grad_clip']}.
- Rows of {cfg['seq_len']}+1 tokens packed from whole documents separated by
  `<|endoftext|>`; each row starts at a document start. Loss on every token.
- Training time: **{tr['train_seconds'] / 60:.1f} minutes** of wall time ({tr['train_seconds']:.0f} s) for the
  training loop, on {report['machine']}, {machine_line(report)}; the average was
  {tr['tokens'] / tr['train_seconds']:,.0f} tokens/s. Final training loss (EMA): {tr['final_loss_ema']}.
- Training-only fast math (`scripts/fast_training_math.py`): during training, the attention softmax, the
  SwiGLU and the loss use a compiled polynomial exp (relative error < 1e-4) instead of MLX's CPU exp, which
  took more time than all matmuls; the model class and saved weights are mlx-lm's, and the evaluation
  below runs the stock functions.
- Library versions: {report['versions']}.

## Corpus

The corpus is **generated by the training script itself** from facts and templates
written into it; nothing is downloaded. License: the facts are public-domain
general knowledge (country capitals and continents use common ASCII English
spellings, e.g. "Bogota", "Reykjavik"; countries with several or disputed capitals
are left out; countries on two continents have no continent fact); the templates,
stories and generated text are part of nbllm and under its MIT license.

- {cfg['corpus_docs']:,} documents, {report['corpus_chars']:,} characters, {report['corpus_tokens']:,} tokens.
- Mix (by document): fact sentences {DOC_WEIGHTS[0]}%, chat conversations {DOC_WEIGHTS[1]}%, JSON lines {DOC_WEIGHTS[2]}%,
  short stories {DOC_WEIGHTS[3]}%, everyday sentences {DOC_WEIGHTS[4]}% (with counting, days/months/seasons and the
  open prompts); fact documents are short, so by tokens chats are about half of the corpus.
- Facts: {sum(n_facts.values())} in {len(n_facts)} families: {', '.join(f'{k} {v}' for k, v in n_facts.items())}.
- Fact sentences: several phrasings per fact, answer-first sentences, and sentences that quote the
  answer (`People in Japan call their capital "Tokyo".`), because inside JSON a value follows a quote and
  is a different token (`Tokyo`) than in running text (` Tokyo`).
- Chats: 1-4 turns, a system message in about a third of them (including a "reply with JSON" mode);
  fact questions, JSON requests, follow-ups that refer to the previous turn (same question about a new
  subject, another question about the same subject, "Say that again in JSON.", "Say that again.",
  "Just the answer, please."), "Tell me about Paris.", counting, favourites, stories (also about a
  named character: "Tell me a story about Mia.").
- Deliberate ambiguity: "My favourite colour is", "My favourite animal is the", "Today is", "Pick a number
  from one to ten:" and a few more are completed by a uniformly random choice in the corpus.

## Evaluation (measured on the shipped folder, loaded with `mlx_lm.load`)

Reproduce: `{report['eval_command']}`

The weights are loaded from the float16 file and upcast to float32 for the evaluation
(float16 matmuls are slow on this CPU; the upcast values are exactly the stored ones; a spot check of
greedy fact answers in float16 vs float32 agreed on {ev['fp16_vs_fp32_spot_agreement']}).

"Held out" means: each fact is trained in several phrasings, and for every fact one phrasing is
never used with that fact (the phrasing is trained with other facts, and the fact in its other
phrasings). The same holds for the chat question, the JSON request and each follow-up wording. Every
fifth country never appears in JSON form anywhere in training (its facts are seen only in sentences,
plain and quoted). The evaluation checks that **none of the {fh['total'] + ch['total'] + jc['total'] + jp['total']} held-out
prompt strings occurs anywhere in the training corpus** (leaks found: {ev['heldout_prompt_leaks']}), nor any of the
{ev['followup_exchanges_checked']} "previous reply + follow-up question" exchanges of the held-out conversations
(leaks found: {ev['followup_exchange_leaks']}). This measures recombining known facts with known phrasings, not
knowledge of new facts.

| measure | version 2 (this model) | version 1 (baseline) |
| --- | --- | --- |
| greedy fact accuracy, held-out phrasings (e.g. "Japan's capital is") | **{fh['accuracy'] * 100:.1f}%** ({fh['correct']}/{fh['total']}) | {b['facts_heldout']} |
| greedy fact accuracy, trained anchor phrasing (e.g. "The capital of Japan is") | {ft['accuracy'] * 100:.1f}% ({ft['correct']}/{ft['total']}) | {b['facts_trained']} |
| perplexity on held-out generated text | **{ev['heldout_ppl']:.2f}** ({ev['heldout_tokens']:,} tokens, {ev['heldout_docs']} documents) | {b['ppl']} (a smaller world) |
| chat exact reply then `<|im_end|>`, held-out questions | **{ch['accuracy'] * 100:.1f}%** ({ch['correct']}/{ch['total']}); stopped on `<|im_end|>`: {ch['stopped_on_im_end'] * 100:.1f}% | {b['chat']} |
| multi-turn follow-ups, exact reply (model's own earlier replies in the history) | **{fu['accuracy'] * 100:.1f}%** ({fu['correct']}/{fu['total']}, {fu['chains']} conversations) | {b['followup']} |
| JSON in chat, held-out request wording | {heldj['valid']}/{heldj['total']} valid, {heldj['correct']}/{heldj['total']} right | {b['json_chat']} |
| **JSON in chat for facts never seen as JSON** | {never['valid']}/{never['total']} valid, **{never['correct']}/{never['total']} right ({never['correct'] / max(1, never['total']) * 100:.1f}%)** | {b['json_never_seen']} |
| JSON completion prompts for countries never seen as JSON | {jp['valid_rate'] * 100:.1f}% valid, {jp['correct_rate'] * 100:.1f}% right ({jp['total']}) | {b['json_completion']} |
| P(" Paris" \\| "The capital of France is") | {ev['p_paris']} | {b['p_paris']} |
| load time (`mlx_lm.load`, modules already imported) | {ev['load_seconds']:.2f} s (first call {ev['load_seconds_first']:.2f} s) | |
| generation speed (`mlx_lm.stream_generate`, batch 1, this CPU) | {ev['greedy_tok_per_s_stored_dtype']:.0f} tokens/s as stored, {ev['greedy_tok_per_s']:.0f} tokens/s in float32 | |

Perplexity by kind of held-out text: {', '.join(f'{k} {v:.2f}' for k, v in ev['heldout_ppl_by_kind'].items())}.

Held-out fact accuracy by family:

| family | facts | held-out phrasing correct | anchor phrasing correct |
| --- | --- | --- | --- |
{fam_rows}

Multi-turn follow-ups by kind ("held-out": every turn in the wording that fact never sees in training;
"anchor": the trained wordings the README uses, e.g. "And of France?", "What about its continent?",
"Say that again in JSON."):

| turn | correct |
| --- | --- |
{fu_rows}

Example conversations (greedy, the model's own replies):

{transcripts}

Deliberate ambiguity: entropy of the next-token distribution (bits), the probability the model gives
to the options the corpus uses, and the top candidates:

| prompt | entropy, bits | P(options) | top candidates |
| --- | --- | --- | --- |
{amb_rows}

Greedy samples:

{samples}

## Using it

```python
import nbllm
lm = nbllm.load()                                     # this model
lm.generate("The capital of France is", raw=True, max_tokens=3).text   # ' Paris.'
chat = nbllm.Chat(lm)
chat.send("What is the capital of Japan?").text       # 'The capital of Japan is Tokyo.'
chat.send("And of France?").text                      # 'The capital of France is Paris.'
```

With mlx-lm directly: `mlx_lm.load("nbllm/assets/default-model")`; on a CPU,
`model.set_dtype(mlx.core.float32)` after loading makes generation several times faster
(float32 matmuls use BLAS); Apple-silicon GPUs run float16 natively.

## Intended use and limits

Teaching only: tokenization, sampling (facts have a sharp distribution, stories and the open
prompts a wide one), chat templates and multi-turn context, stop tokens, KV caches and structured
(JSON) generation, offline and fast. It is not a source of facts: it was trained on a fixed list of
{n_facts['capital']} capitals and small sums and will confidently make up answers for anything else.
"""
    (out / "MODEL_CARD.md").write_text(card)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def versions():
    import importlib.metadata as md
    return ", ".join(f"{p} {md.version(p)}" for p in ["mlx", "mlx-lm", "tokenizers", "transformers"])


DEFAULT_DRAFT_OUT = REPO_ROOT / "nbllm" / "assets" / "default-draft"


def load_tokenizer(folder):
    """The tokenizer of an existing model folder (the draft shares the default model's)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2], "special tokens differ"
    return tok


def run_command(a, steps):
    """The command that reproduces this run, with the thread and core settings it ran under."""
    parts = []
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        parts.append(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and len(cpus) < (os.cpu_count() or len(cpus)):
        parts.append("taskset -c " + ",".join(map(str, cpus)))
    parts += [".venv/bin/python scripts/train_default_model.py", f"--steps {steps}"]
    if a.size != "default":
        parts.append(f"--size {a.size}")
    if a.seed != CONFIG["seed"]:
        parts.append(f"--seed {a.seed}")
    if a.corpus_docs != CONFIG["corpus_docs"]:
        parts.append(f"--corpus-docs {a.corpus_docs}")
    if a.out != str(a.default_out):
        parts.append(f"--out {a.out}")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(MODEL_SIZES), default="default",
                    help="default: the embedded model; draft: a small draft model for speculative "
                         "decoding with the default model's tokenizer")
    ap.add_argument("--out", default=None, help="model folder (default nbllm/assets/default-model, "
                                                "or default-draft with --size draft)")
    ap.add_argument("--tokenizer-from", default=None,
                    help="reuse this folder's tokenizer instead of training one (default for --size draft: "
                         "nbllm/assets/default-model)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training budget (default_minutes of the size); sets --steps from measured speed")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of optimizer steps")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate an existing folder")
    ap.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from training_report.json")
    ap.add_argument("--quick-eval", action="store_true", help="evaluate a third of the held-out sets (pilots)")
    ap.add_argument("--seed", type=int, default=CONFIG["seed"])
    ap.add_argument("--corpus-docs", type=int, default=CONFIG["corpus_docs"],
                    help="documents to generate (smaller for a quick smoke test)")
    ap.add_argument("--machine-note", default="",
                    help="what else ran on the machine, for the card (e.g. another training job on the other core)")
    a = ap.parse_args()
    a.default_out = DEFAULT_DRAFT_OUT if a.size == "draft" else DEFAULT_OUT
    a.out = a.out or str(a.default_out)
    if a.size == "draft" and a.tokenizer_from is None:
        a.tokenizer_from = str(DEFAULT_OUT)
    cfg = dict(CONFIG, **MODEL_SIZES[a.size])
    cfg.update(seed=a.seed, corpus_docs=a.corpus_docs, size=a.size)
    out = Path(a.out)
    card = write_draft_card if a.size == "draft" else write_card
    if a.card_only:
        card(out, json.loads((out / "training_report.json").read_text()))
        return
    seed = cfg["seed"]
    random.seed(seed)
    np.random.seed(seed)

    t = time.time()
    world = World()
    corpus = make_corpus(world, cfg["corpus_docs"], seed)
    corpus_text = "\n".join(corpus)
    train_set = set(corpus)
    log(f"corpus: {len(corpus):,} docs, {len(corpus_text):,} chars ({time.time() - t:.1f}s)")

    if a.eval_only:
        report_path = out / "training_report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        ev = evaluate(out, world, corpus_text, train_set, cfg, seed, quick=a.quick_eval)
        log(json.dumps({k: v for k, v in ev.items() if k != "samples"}, indent=1))
        if report is not None:
            report["eval"] = ev
            report["folder_bytes"] = folder_size_bytes(out)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
            card(out, report)
        return

    t = time.time()
    if a.tokenizer_from:
        tok = load_tokenizer(a.tokenizer_from)
        log(f"tokenizer: vocab {tok.get_vocab_size()} from {a.tokenizer_from}")
    else:
        tok = train_tokenizer(corpus[: cfg["tokenizer_docs"]], cfg["vocab_size"])
        log(f"tokenizer: vocab {tok.get_vocab_size()} ({time.time() - t:.1f}s)")
    vocab_size = tok.get_vocab_size()
    t = time.time()
    doc_tokens = [e.ids for e in tok.encode_batch(corpus, add_special_tokens=False)]
    corpus_tokens = sum(len(d) + 1 for d in doc_tokens)
    log(f"encoded corpus: {corpus_tokens:,} tokens, {corpus_tokens / len(corpus):.1f}/doc "
        f"({time.time() - t:.1f}s)")

    minutes = a.minutes if a.minutes is not None else cfg["default_minutes"]
    load_before = loadavg()
    log(f"load average before training: {load_before}")
    model, args, tr = train(cfg, doc_tokens, vocab_size, tok.token_to_id(EOT), a.steps,
                            minutes, seed)
    load_after = loadavg()
    write_folder(out, model, cfg, tok, vocab_size)
    log(f"wrote {out}")

    report = {
        "command": run_command(a, tr["steps"]),
        "eval_command": ".venv/bin/python scripts/train_default_model.py --eval-only"
                        + (f" --size {a.size}" if a.size != "default" else "")
                        + (f" --out {a.out}" if a.out != str(a.default_out) else ""),
        "config": cfg,
        "vocab_size": vocab_size,
        "tokenizer_from": os.path.relpath(a.tokenizer_from, REPO_ROOT) if a.tokenizer_from else None,
        "n_facts": {k: len(v) for k, v in world.facts.items()},
        "corpus_chars": len(corpus_text),
        "corpus_tokens": corpus_tokens,
        "training": tr,
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} cores" if platform.system() == "Linux"
                   else platform.platform(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "OpenBLAS default"),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine_note": a.machine_note,
        "versions": versions(),
        "load_before": load_before, "load_after": load_after,
        "minutes_budget": None if a.steps else minutes,
    }
    ev = evaluate(out, world, corpus_text, train_set, cfg, seed, quick=a.quick_eval)
    report["eval"] = ev
    report["folder_bytes"] = 0
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    card(out, report)
    report["folder_bytes"] = folder_size_bytes(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    card(out, report)
    log(json.dumps({k: v for k, v in ev.items() if k != "samples"}, indent=1))
    log(f"folder size {report['folder_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
