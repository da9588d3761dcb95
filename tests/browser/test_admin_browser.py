"""The admin as an operator sees it: headless Chromium (Debian's chromium and chromium-driver) over a live server.

Logs in (password and TOTP code), then checks that money records offer no delete or edit, that amounts read "0.10 USDC", that an
agreement's page has its panels (live on-chain escrow, dispute, chain transactions, usage events, webhook
deliveries), and that the dashboard lists what is overdue and draws its charts. Every page is saved as a
screenshot under var/test-artifacts/admin/ for a person to look at.
"""

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from agreements.models import AgreementStatus, UsageAgreement
from escrow.models import ChainTransaction, TxPurpose
from tests.agreements.helpers import propose
from tests.catalog.factories import register_service
from tests.escrow.flow import confirm_all
from tests.marketplace.conftest import active_agreement
from tests.support.operators import code, enrol

pytestmark = [pytest.mark.slow, pytest.mark.chain, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "admin"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WIDTH = 1400


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver: `make browser`")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="admin-browser-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                 f"--window-size={WIDTH},1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Operator:
    def __init__(self, driver, base_url: str):
        self.driver, self.base_url = driver, base_url

    def open(self, path: str, screenshot: str):
        """Load the page, then save all of it (the window grown to the page's height) as a screenshot."""
        from selenium.webdriver.common.by import By

        self.driver.set_window_size(WIDTH, 1000)
        self.driver.get(self.base_url + path)
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(WIDTH, min(max(height + 120, 800), 6000))
        self.driver.save_screenshot(str(ARTIFACTS / f"{screenshot}.png"))
        return self.driver.find_element(By.TAG_NAME, "body")

    def scrolls_sideways(self) -> bool:
        """The page, or a list's own scroll box, is wider than the window."""
        return self.driver.execute_script(
            "const boxes = [document.documentElement, ...document.querySelectorAll('.results')];"
            "return boxes.some(box => box.scrollWidth > box.clientWidth + 1)")

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)


def test_an_operator_reads_money_in_the_admin(browser, live_server, escrow_chain, http_server,
                                              django_capture_on_commit_callbacks, buyer_api, seller, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("operator", "operator@example.com", "operator-password")
    authenticator = enrol("operator")  # the second factor, as in production (ADMIN_REQUIRE_SECOND_FACTOR)
    parties = active_agreement(escrow_chain, django_capture_on_commit_callbacks, http_server.url)
    for _ in range(2):
        assert parties.buyer_api.get(f"{parties.proxy}/work").status_code == 200
    confirm_all(django_capture_on_commit_callbacks)
    late = propose(buyer_api, register_service(seller), quantity=1)  # overdue: its window closed an hour ago
    UsageAgreement.objects.filter(pk=late["id"]).update(status=AgreementStatus.IN_CHALLENGE,
                                                        challenge_deadline=timezone.now() - timedelta(hours=1))
    activation = ChainTransaction.objects.get(purpose=TxPurpose.ACTIVATE, agreement_id=parties.agreement_id)
    operator = Operator(browser, live_server.url)

    operator.open("/admin/login/?next=/admin/", "01-login")
    operator.css("#id_username")[0].send_keys("operator")
    operator.css("#id_password")[0].send_keys("operator-password")
    operator.css("#id_otp_token")[0].send_keys(code(authenticator))
    operator.css("input[type=submit]")[0].click()
    index = operator.open("/admin/", "02-index")
    assert "Agent Escrow Marketplace" in index.text and "Webhook deliveries" in index.text

    transactions = operator.open("/admin/escrow/chaintransaction/", "03-chain-transactions")
    actions = [option.get_attribute("value") for option in operator.css("select[name=action] option")]
    assert "delete_selected" not in actions and "retry_failed" in actions
    assert "Confirmed" in transactions.text and not operator.scrolls_sideways()
    operator.open(f"/admin/escrow/chaintransaction/{activation.pk}/change/", "04-chain-transaction")
    assert not operator.css("input[name=_save]") and not operator.css("a.deletelink")
    assert activation.mined_tx_hash[:10] in browser.page_source

    agreements = operator.open("/admin/agreements/usageagreement/", "05-agreements")
    assert "0.10 USDC" in agreements.text and not operator.scrolls_sideways()
    page = operator.open(f"/admin/agreements/usageagreement/{parties.agreement_id}/change/", "06-agreement")
    assert not operator.css("input[name=_save]") and not operator.css("a.deletelink")
    onchain = operator.css("#onchain-panel")[0].text
    assert "active" in onchain and "matches our records" in onchain and "0.10 USDC" in onchain
    assert operator.css("#dispute-panel")[0].text == "Not disputed."
    assert "0.04 USDC" in page.text  # used: two calls at 0.02
    assert "Activate" in page.text and "Confirmed" in page.text  # the chain transactions inline
    assert "Proxy" in page.text  # usage events with their receipts
    assert "WEBHOOK DELIVERIES" in page.text.upper()

    usage = operator.open("/admin/agreements/usageevent/", "07-usage-events")
    assert "0.02 USDC" in usage.text and not operator.css("select[name=action] option[value=delete_selected]")

    dashboard = operator.open("/admin/dashboard/", "08-dashboard")
    overdue = operator.css("#overdue tr.overdue-item")
    assert len(overdue) == 1 and "challenge window over" in overdue[0].text
    assert len(operator.css("svg.chart")) == 3 and operator.css("svg.chart rect.bar")
    assert "Relayer gas" in dashboard.text and "Treasury USDC float" in dashboard.text
    operator.open("/admin/dashboard/?period=30d", "09-dashboard-30-days")

    UsageAgreement.objects.filter(pk=parties.agreement_id).update(status=AgreementStatus.DISPUTED,
                                                                  status_reason="wrong answers")
    operator.open(f"/admin/agreements/usageagreement/{parties.agreement_id}/change/", "10-agreement-disputed")
    assert "Resolve" in operator.css("#dispute-panel")[0].find_element("xpath", "..").text
