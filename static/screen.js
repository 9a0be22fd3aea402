// screen.js: the watch page's full screen and picture-in-picture controls.
//
// Buttons, double-click (mouse) or double-tap (touch: phones fire no dblclick on a video) for full
// screen; a browser without a feature gets a disabled button that says why, never a dead one.

const DOUBLE_TAP_MS = 300;

export class ScreenControls {
  /** stage, video, fullscreen and pip are elements; onError(text) shows a passing message. */
  constructor({ stage, video, fullscreen, pip, onError }) {
    Object.assign(this, { stage, video, fullscreen, pip, onError });
    this.canFullscreen = Boolean(document.fullscreenEnabled || video.webkitEnterFullscreen);
    this.canPip = Boolean(document.pictureInPictureEnabled) && typeof video.requestPictureInPicture === 'function';
    const sync = () => this.syncLabels();
    fullscreen.addEventListener('click', () => this.toggleFullscreen());
    pip.addEventListener('click', () => this.togglePip());
    document.addEventListener('fullscreenchange', sync);
    video.addEventListener('enterpictureinpicture', sync);
    video.addEventListener('leavepictureinpicture', sync);
    let lastTap = 0;
    stage.addEventListener('pointerup', (e) => {
      if (e.pointerType !== 'touch' || e.target.closest('button, a')) return;
      if (e.timeStamp - lastTap < DOUBLE_TAP_MS) {
        lastTap = 0;
        this.toggleFullscreen();
      } else {
        lastTap = e.timeStamp;
      }
    });
    stage.addEventListener('dblclick', (e) => {
      if (e.target.closest('button, a') || (e.sourceCapabilities?.firesTouchEvents ?? false)) return;
      this.toggleFullscreen();
    });
  }

  /** `picture`: a picture is showing (picture in picture needs one). */
  render(picture) {
    const { fullscreen, pip, canFullscreen, canPip } = this;
    fullscreen.disabled = !canFullscreen;
    fullscreen.title = canFullscreen ? 'Full screen (or double-click the video)' : 'This browser cannot show the video full screen';
    pip.disabled = !canPip || !picture;
    pip.title = canPip ? 'Picture in picture' : 'This browser has no picture in picture';
    pip.dataset.supported = String(canPip);
  }

  async toggleFullscreen() {
    try {
      if (document.fullscreenElement) await document.exitFullscreen();
      else if (document.fullscreenEnabled) await this.stage.requestFullscreen();
      else this.video.webkitEnterFullscreen?.(); // iPhone Safari: only the video element goes full screen
    } catch (err) {
      this.onError(`Full screen is not available here (${err.message || err}).`);
    }
  }

  async togglePip() {
    try {
      if (document.pictureInPictureElement) await document.exitPictureInPicture();
      else await this.video.requestPictureInPicture();
    } catch (err) {
      this.onError(`Picture in picture is not available here (${err.message || err}).`);
    }
  }

  syncLabels() {
    const full = Boolean(document.fullscreenElement);
    this.fullscreen.setAttribute('aria-pressed', String(full));
    this.fullscreen.setAttribute('aria-label', full ? 'Exit full screen' : 'Full screen');
    this.pip.setAttribute('aria-pressed', String(Boolean(document.pictureInPictureElement)));
  }
}
