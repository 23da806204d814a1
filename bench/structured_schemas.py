"""Twenty pydantic models for `client.chat.completions.parse(response_format=Model)`: nested
objects, enums, arrays, optional fields, numbers with bounds. Used by the end-to-end test
(tests/e2e/test_structured_e2e.py) and bench/structured_clients.py.

Strings and arrays carry a maximum length: the grammar enforces it, and it keeps a small
model's greedy output (which may repeat a phrase inside a string) within max_tokens.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

Short = Field(max_length=24)


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)


class City(BaseModel):
    name: str = Short
    country: str = Short
    population: int = Field(ge=0, le=50_000_000)


class Answer(BaseModel):
    answer: Literal["yes", "no"]


class Paint(BaseModel):
    color: Color
    glossy: bool


class Point(BaseModel):
    x: float = Field(ge=-100, le=100)
    y: float = Field(ge=-100, le=100)


class Segment(BaseModel):
    start: Point
    end: Point


class Tags(BaseModel):
    tags: list[str] = Field(max_length=3)


class Book(BaseModel):
    title: str = Short
    author: Person
    year: int = Field(ge=1400, le=2030)


class Pet(BaseModel):
    name: str = Short
    species: Literal["cat", "dog", "fish", "bird"]
    nickname: str | None = Field(default=None, max_length=16)


class Address(BaseModel):
    street: str = Short
    city: str = Short
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Contact(BaseModel):
    person: Person
    address: Address
    email: str | None = Field(default=None, max_length=32)


class Weather(BaseModel):
    city: str = Short
    temperature_c: int = Field(ge=-60, le=60)
    condition: Literal["sunny", "cloudy", "rainy", "snowy"]


class Step(BaseModel):
    order: int = Field(ge=1, le=10)
    action: str = Short


class Recipe(BaseModel):
    dish: str = Short
    steps: list[Step] = Field(min_length=1, max_length=3)


class Score(BaseModel):
    team: str = Short
    points: int = Field(ge=0, le=200)


class Match(BaseModel):
    home: Score
    away: Score
    finished: bool


class Priority(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"


class Task(BaseModel):
    title: str = Short
    priority: Priority
    done: bool
    due: str | None = Field(default=None, pattern=r"^2[0-9]{3}-[01][0-9]-[0-3][0-9]$")


class Inventory(BaseModel):
    items: list[str] = Field(max_length=4)
    counts: list[int] = Field(max_length=4)


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


class Flight(BaseModel):
    origin: str = Field(pattern=r"^[A-Z]{3}$")
    destination: str = Field(pattern=r"^[A-Z]{3}$")
    stops: int = Field(ge=0, le=3)


class Movie(BaseModel):
    title: str = Short
    genre: Literal["drama", "comedy", "action", "horror"]
    rating: float = Field(ge=0, le=10)


class Planet(BaseModel):
    name: str = Short
    moons: int = Field(ge=0, le=200)
    has_rings: bool


SCHEMAS: list[type[BaseModel]] = [
    Person, City, Answer, Paint, Point, Segment, Tags, Book, Pet, Address,
    Contact, Weather, Recipe, Match, Task, Inventory, Sentiment, Flight, Movie, Planet,
]  # fmt: skip

PROMPTS = {
    "Person": "Give a person's name and age.",
    "City": "Describe a big city: its name, country and population.",
    "Answer": "Is water wet?",
    "Paint": "Describe a paint: its color and whether it is glossy.",
    "Point": "Give a point on a plane.",
    "Segment": "Give a line segment by its two end points.",
    "Tags": "Give three tags for a blog post about cooking.",
    "Book": "Describe a famous book.",
    "Pet": "Describe a pet.",
    "Address": "Give a postal address in the United States.",
    "Contact": "Give a contact card for a person with their address.",
    "Weather": "Report the weather in Paris.",
    "Recipe": "Give a short recipe for tea.",
    "Match": "Report the score of a football match.",
    "Task": "Describe a task on a to-do list.",
    "Inventory": "List the items in a small shop and how many of each.",
    "Sentiment": "What is the sentiment of: 'I love this movie!'",
    "Flight": "Describe a flight between two airports.",
    "Movie": "Describe a movie.",
    "Planet": "Describe a planet of the solar system.",
}


def prompt_for(cls: type[BaseModel]) -> str:
    return f"{PROMPTS[cls.__name__]} Answer in JSON."
