"""A FastAPI app: a typed path parameter (422 on a bad one), a JSON echo, its OpenAPI."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI(title="sockshare test")


@app.get("/users/{user_id}")
async def user(user_id: int, verbose: bool = False) -> dict[str, Any]:
    return {"user_id": user_id, "verbose": verbose}


@app.post("/echo")
async def echo(body: dict[str, Any]) -> dict[str, Any]:
    return {"got": body}
