"""A generated world of fictional entities and the documents and questions about it (no downloads).

Entities: countries, cities (each in a country), people (each born in a city) and companies (each founded by a
person and headquartered in a city). Each entity has one short document. Questions follow relation chains of 1 to
3 hops; ``chain`` lists the entity whose document each hop must read, in order, so a scripted policy (and the
tests) can issue exactly the searches a question needs.
"""

from __future__ import annotations

import dataclasses
import random

_SYLLABLES = ["bar", "cel", "dor", "fen", "gal", "hol", "iv", "jor", "kal", "lum", "mir", "nor", "ost", "pel",
              "quin", "ras", "sol", "tar", "ul", "ven", "wex", "yor", "zan", "bri", "cro", "dra", "el", "fau"]
_FIRST_NAMES = ["Ada", "Bram", "Cora", "Dario", "Elin", "Fiona", "Goran", "Hilde", "Ilan", "Jun", "Kira", "Leon",
                "Mara", "Nils", "Orla", "Pavel", "Rhea", "Soren", "Tova", "Uma", "Vito", "Wren", "Yara", "Zeno"]
_COUNTRY_SUFFIXES = ["ia", "land", "stan", "ora", "ovia"]
_CITY_SUFFIXES = ["ford", "burg", "haven", "port", "mouth", "ton"]
_COMPANY_SUFFIXES = ["Corp", "Labs", "Industries", "Systems", "Works"]
_PROFESSIONS = ["engineer", "chemist", "painter", "inventor", "economist", "architect", "composer", "pilot"]
_PRODUCTS = ["batteries", "bicycles", "telescopes", "software", "textiles", "robots", "ceramics", "satellites"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    titles: list[str]          # document titles (entity names), one per document
    texts: list[str]           # document bodies, same order
    questions: list[dict]      # question, answer, num_hops, chain (entity names to look up, in order)

    def document(self, title: str) -> str:
        return self.texts[self.titles.index(title)]


def _name_maker(rng: random.Random):
    used: set[str] = set()

    def make(syllables: int, suffix: str = "") -> str:
        while True:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)) + suffix
            if word not in used:
                used.add(word)
                return word.capitalize()

    return make


def generate(seed: int = 0, num_countries: int = 8, num_cities: int = 30, num_people: int = 80,
             num_companies: int = 50) -> Corpus:
    """Build the world for ``seed``: same seed, same documents and questions."""
    rng = random.Random(f"search-qa-corpus-{seed}")
    make = _name_maker(rng)
    countries = [make(2, rng.choice(_COUNTRY_SUFFIXES)) for _ in range(num_countries)]
    cities = {make(2, rng.choice(_CITY_SUFFIXES)): rng.choice(countries) for _ in range(num_cities)}
    city_names = list(cities)
    people = {f"{rng.choice(_FIRST_NAMES)} {make(3)}": (rng.choice(city_names), rng.choice(_PROFESSIONS))
              for _ in range(num_people)}
    person_names = list(people)
    companies = {f"{make(2)} {rng.choice(_COMPANY_SUFFIXES)}": (rng.choice(person_names), rng.choice(city_names),
                                                                rng.choice(_PRODUCTS))
                 for _ in range(num_companies)}
    titles, texts = [], []

    def add(title: str, text: str) -> None:
        titles.append(title)
        texts.append(f"{title}. {text}")

    for country in countries:
        members = [c for c, k in cities.items() if k == country]
        add(country, f"{country} is a country. Its cities include {', '.join(members) or 'none on record'}.")
    for city, country in cities.items():
        add(city, f"{city} is a city in the country of {country}.")
    for person, (city, job) in people.items():
        founded = [c for c, (f, _, _) in companies.items() if f == person]
        extra = f" {person} founded {', '.join(founded)}." if founded else ""
        article = "an" if job[0] in "aeiou" else "a"
        add(person, f"{person} is {article} {job} who was born in the city of {city}.{extra}")
    for company, (founder, city, product) in companies.items():
        add(company, f"{company} is a company that makes {product}. It was founded by {founder}. "
                     f"Its headquarters are in the city of {city}.")
    return Corpus(titles, texts, _questions(cities, people, companies))


def _questions(cities: dict, people: dict, companies: dict) -> list[dict]:
    out = []

    def ask(question: str, answer: str, chain: list[str]) -> None:
        out.append({"question": question, "answer": answer, "num_hops": len(chain), "chain": chain})

    for city, country in cities.items():
        ask(f"In which country is the city of {city}?", country, [city])
    for person, (city, _) in people.items():
        ask(f"In which city was {person} born?", city, [person])
        ask(f"In which country was {person} born?", cities[city], [person, city])
    for company, (founder, hq, _) in companies.items():
        born = people[founder][0]
        ask(f"Who founded {company}?", founder, [company])
        ask(f"In which city is {company} headquartered?", hq, [company])
        ask(f"In which country is {company} headquartered?", cities[hq], [company, hq])
        ask(f"In which city was the founder of {company} born?", born, [company, founder])
        ask(f"In which country was the founder of {company} born?", cities[born], [company, founder, born])
    return out
