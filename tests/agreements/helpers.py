from datetime import timedelta

from django.utils import timezone

from catalog.models import Service


def proposal(service: Service, **overrides) -> dict:
    body = {"service_id": str(service.pk), "quantity": 10,
            "expires_at": (timezone.now() + timedelta(days=2)).isoformat()}
    body.update(overrides)
    return body


def propose(buyer_api, service: Service, **overrides) -> dict:
    response = buyer_api.post("/usage-agreements", proposal(service, **overrides))
    assert response.status_code == 201, response.content
    return response.json()
