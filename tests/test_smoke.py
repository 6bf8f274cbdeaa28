from tests.conftest import Gateway


def test_wakes_app_and_answers(gateway: Gateway) -> None:
    resp = gateway.request("/")
    assert resp.status == 200
    assert resp.body == b"hello from echo/main\n"
