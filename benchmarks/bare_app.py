"""The framework's ceiling for benchmarks/serving_load.py: a bare FastAPI endpoint answering
GET /recommend with a constant JSON body of the service's shape and size (ten scored items),
run under uvicorn exactly as `s2meta serve` runs the service."""

from fastapi import FastAPI

RESPONSE = {
    "user": "473",
    "scenario": "60",
    "revision": 1,
    "meta_learner": "v0001",
    "source": "adapted",
    "items": [{"item": str(1000 + k), "score": 0.8180123 - k / 100} for k in range(10)],
}

app = FastAPI()


@app.get("/recommend")
async def recommend() -> dict:
    return RESPONSE
