// share.js: the watch page's share dialog: the watch link to copy, and its QR code.

/** els: share (button), shareDialog, shareUrl, shareQr, shareCopy, shareResult. */
export function setUpShare(els, { broadcastId, token, base }) {
  // The link without this viewer's invite: an invite is personal.
  const shareUrl = () => `${window.location.origin}/watch/${encodeURIComponent(broadcastId)}`
    + `?token=${encodeURIComponent(token)}`;

  els.share.addEventListener('click', () => {
    els.shareUrl.value = shareUrl();
    els.shareResult.textContent = '';
    if (!els.shareQr.getAttribute('src')) els.shareQr.src = `${base}/qr.svg?token=${encodeURIComponent(token)}`;
    els.shareDialog.showModal();
    els.shareUrl.select();
  });
  els.shareCopy.addEventListener('click', async () => {
    els.shareUrl.select();
    try {
      await navigator.clipboard.writeText(els.shareUrl.value);
      els.shareResult.textContent = 'Link copied.';
    } catch {
      els.shareResult.textContent = 'Press Ctrl+C (or long-press) to copy the selected link.';
    }
  });
}
